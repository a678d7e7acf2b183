"""Int8 computed as the Q/DQ graph says, on every CPU (engines.cpu, engines.onnxruntime.exact_int8).

The reference is the graph's own meaning: ONNX Runtime with its graph optimizations off runs each
QuantizeLinear and DequantizeLinear as written and the MatMuls in float, fusing nothing into int8
kernels. The int8 kernels must agree with it up to requantization rounding, whatever the CPU; on an
x86 CPU without VNNI, ONNX Runtime's U8S8 kernels did not (relative error 0.068 against 0.008 here).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from engines.cpu import INT8_DOT_PRODUCT, cpu_flags, cpu_model, int8_saturates
from engines.errors import EngineError
from engines.onnxruntime.exact_int8 import exact_int8, has_int8_operands, session_source, to_uint8_operands
from engines.onnxruntime.runner import create_session, session_options
from tests.engine_fixtures import relative_error

pytest_plugins = ("tests.engine_fixtures",)

# Two computations of the same int8 graph differ by requantization rounding only; a saturating
# kernel (0.06 on the tiny model) or a wrong zero point (order 1) is far above this.
SAME_GRAPH = 0.01


def as_written(model, batch) -> dict[str, np.ndarray]:
    """The graph's meaning: no fusion, so every Q/DQ runs as a separate op and the MatMuls in float."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), session_options(optimization_level="disable"),
                                           providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": batch}), strict=True))


def fused(model, batch, tmp_path) -> tuple[dict[str, np.ndarray], set[str]]:
    """The outputs with ONNX Runtime's int8 kernels, and the op types of the graph it ran."""
    import onnxruntime

    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": batch}), strict=True))
    return outputs, {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


@pytest.mark.parametrize("machine, flags, saturates", [
    ("x86_64", {"avx2": True}, True),  # VPMADDUBSW adds two products in 16 bits
    ("x86_64", {"avx2": True, "avx512f": True}, True),  # AVX-512 without VNNI: the same instruction, wider
    ("x86_64", {"avx512_vnni": True}, False),
    ("x86_64", {"avx_vnni": True}, False),
    ("x86_64", {"amx_int8": True}, False),
    ("x86_64", {}, True),  # flags unreadable: take the exact route
    ("AMD64", {}, True),
    ("aarch64", {}, False),  # ARM's kernels widen before they add
    ("arm64", {}, False),
])
def test_which_cpus_saturate(machine, flags, saturates):
    assert int8_saturates(flags, machine) is saturates


@pytest.mark.parametrize("pairs, machine, flags, named", [
    ([("onnxruntime", "int8"), ("openvino", "int8")], "x86_64", {"avx2": True}, "onnxruntime and openvino int8"),
    ([("onnxruntime", "fp32"), ("openvino", "int8")], "x86_64", {"avx2": True}, "openvino int8"),
    ([("onnxruntime", "backbone=int8,heads=fp16")], "x86_64", {"avx2": True}, "onnxruntime int8"),
    ([("onnxruntime", "int8")], "x86_64", {"avx512_vnni": True}, None),  # int8 has its speed there
    ([("onnxruntime", "int8")], "aarch64", {}, None),
    ([("tensorrt", "int8")], "x86_64", {"avx2": True}, None),  # runs on the GPU
    ([("onnxruntime", "auto")], "x86_64", {"avx2": True}, None),  # auto times its candidates itself
    ([("onnxruntime", "fp16"), ("openvino", "bf16")], "x86_64", {"avx2": True}, None),
])
def test_a_build_says_when_int8_cannot_be_faster_on_this_cpu(pairs, machine, flags, named):
    from export.pipeline.build import int8_speed_note

    note = int8_speed_note(pairs, flags, machine)
    assert (note is None) if named is None else (named in note and "slower than fp32" in note), note


def test_this_cpu_is_read_once_and_named():
    assert cpu_flags() is not cpu_flags() and cpu_flags() == cpu_flags()  # a fresh dict each call, one reading
    assert set(cpu_flags(("avx2", "no_such_flag"))) <= {"avx2", "no_such_flag"}
    assert cpu_model()


def test_uint8_operands_are_the_same_graph(qdq_onnx, test_batch, tmp_path):
    signed = onnx.load(str(qdq_onnx))
    assert has_int8_operands(signed)
    unsigned = to_uint8_operands(signed)
    assert not has_int8_operands(unsigned)
    initializers = {i.name: i for i in unsigned.graph.initializer}
    qdq = [n for n in unsigned.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(initializers[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in qdq)
    weights = [n.input[0] for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert weights and all(initializers[w].data_type == onnx.TensorProto.UINT8 for w in weights)
    # Nothing signed is left behind: the old weights and zero points are gone, not merely unused.
    assert not any(i.data_type == onnx.TensorProto.INT8 for i in unsigned.graph.initializer)
    # As written, the two graphs are one function (the grids are the same numbers).
    for a, b in zip(as_written(signed, test_batch).values(), as_written(unsigned, test_batch).values(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # ... and ONNX Runtime computes the uint8 one with its int8 kernels, as the graph says.
    outputs, ops = fused(unsigned, test_batch, tmp_path)
    assert ops & {"MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "MatMulInteger"}, ops
    assert max(relative_error(outputs, as_written(signed, test_batch)).values()) < SAME_GRAPH


def test_weights_only_or_activations_only(qdq_onnx):
    signed = onnx.load(str(qdq_onnx))
    initializers = {i.name: i for i in signed.graph.initializer}
    weight_dqs = {n.name for n in signed.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
    for weights, activations in ((True, False), (False, True)):
        model = to_uint8_operands(signed, weights=weights, activations=activations)
        types = {i.name: i.data_type for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                moved = weights if node.name in weight_dqs else activations
                assert types[node.input[2]] == (onnx.TensorProto.UINT8 if moved else onnx.TensorProto.INT8), node.name


def test_sessions_compute_int8_graphs_as_written_on_this_cpu(qdq_onnx, test_batch):
    """Every session our code opens on a Q/DQ graph (engines, calibration's probes, checks) goes
    through `create_session` or `exact_int8`; on this CPU, whichever it is, they agree with the graph."""
    expected = as_written(onnx.load(str(qdq_onnx)), test_batch)
    session = create_session(qdq_onnx, ["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": test_batch}), strict=True))
    assert max(relative_error(outputs, expected).values()) < SAME_GRAPH
    model = onnx.load(str(qdq_onnx))
    assert (exact_int8(model) is model) is not int8_saturates()  # converted exactly where it must be
    assert isinstance(session_source(qdq_onnx, ["CPUExecutionProvider"]), bytes) is int8_saturates()


def test_graphs_without_qdq_ops_open_from_their_path(tiny_onnx, tmp_path):
    """An fp32 graph is opened as it is, without being parsed to look for int8 operands; so is a file
    that cannot be read, which ONNX Runtime then reports."""
    assert session_source(tiny_onnx, ["CPUExecutionProvider"]) == str(tiny_onnx)
    (tmp_path / "empty.onnx").write_bytes(b"")
    for path in (tmp_path / "empty.onnx", tmp_path / "missing.onnx"):
        assert session_source(path, ["CPUExecutionProvider"]) == str(path)
        with pytest.raises(EngineError, match="onnxruntime cannot load"):
            create_session(path, ["CPUExecutionProvider"])


def test_the_runner_says_when_it_holds_weights_as_uint8(tmp_path, tiny_onnx, calibration_set, test_batch):
    from calibration.prepare import prepare_graph
    from engines.onnxruntime.build import build
    from engines.onnxruntime.runner import load

    prepared = prepare_graph("onnxruntime", tiny_onnx, tmp_path / "work", "int8", calibration=calibration_set)
    artifact = build(prepared.path, tmp_path / "out", precision="int8", metadata=prepared.metadata)
    expected = as_written(onnx.load(str(prepared.metadata["signed_qdq_onnx"])), test_batch)
    with load(artifact.path) as runner:
        outputs = runner.infer({"image": test_batch})
        said = [note for note in runner.notes if "uint8 at load" in note]
    assert max(relative_error(outputs, expected).values()) < SAME_GRAPH
    assert bool(said) is int8_saturates()
    if said:
        assert all(flag in said[0] for flag in INT8_DOT_PRODUCT)
