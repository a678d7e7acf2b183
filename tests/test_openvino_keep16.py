"""keep_fp32 on OpenVINO's 16-bit precisions: kept ONNX nodes are marked in the IR, run f32, and the
runtime graph of the compiled model proves which did (real OpenVINO, the tiny multi-task ONNX)."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.prepare import OPENVINO16_DIR, prepare_graph
from engines.errors import EngineError
from engines.files import load_onnx
from tests.engine_fixtures import relative_error

pytest_plugins = ("tests.engine_fixtures",)

ov = pytest.importorskip("openvino")
ov_backend = pytest.importorskip("engines.openvino")
keep = pytest.importorskip("engines.openvino.keep")

CAPABILITIES = [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
needs_bf16 = pytest.mark.skipif("BF16" not in CAPABILITIES, reason=f"this CPU has no bf16 ({CAPABILITIES})")
needs_f16 = pytest.mark.skipif("FP16" not in CAPABILITIES, reason=f"this CPU has no f16 ({CAPABILITIES})")

KEPT_CONV, OTHER_CONV = "/heads.0/Conv", "/heads.1/Conv"
LINEAR = "/proj/MatMul"  # MatMul + bias Add: one FullyConnected in the CPU plugin


def runtime_layers_of(compiled, op_name: str) -> list[dict]:
    return [layer for layer in keep.runtime_layers(compiled) if op_name in layer["original"]]


def compile_marked(tiny_onnx, tmp_path, names, hint):
    core = ov.Core()
    model = ov.convert_model(str(tiny_onnx))
    kept = keep.ops_of_onnx_nodes(model, load_onnx(tiny_onnx), names)
    model = keep.mark_kept(core, model, kept, tmp_path)
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint}), model, kept


def infer(compiled, batch) -> dict[str, np.ndarray]:
    results = compiled.create_infer_request().infer({"image": batch})
    return {port.get_any_name(): np.array(results[port]) for port in compiled.outputs}


def test_onnx_nodes_map_to_the_openvino_ops_that_compute_them(tiny_onnx):
    source = load_onnx(tiny_onnx)
    model = ov.convert_model(str(tiny_onnx))
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ops()}
    constant = next(n.name for n in source.graph.node if n.op_type == "Constant")
    mapping = keep.ops_of_onnx_nodes(
        model, source, ["/stem/Conv", "/act/Erf", "/norm1/LayerNormalization", LINEAR, constant]
    )
    # A Conv with a bias is a Convolution and an Add; LayerNormalization an MVN (and its affine ops).
    assert sorted(types[op] for op in mapping["/stem/Conv"]) == ["Add", "Convolution"]
    assert "MVN" in {types[op] for op in mapping["/norm1/LayerNormalization"]}
    assert [types[op] for op in mapping[LINEAR]] == ["MatMul"]
    # Erf's output vanished into OpenVINO's Gelu: the node is kept by keeping that Gelu.
    assert [types[op] for op in mapping["/act/Erf"]] == ["Gelu"]
    assert mapping[constant] == []  # folded into a constant: nothing runs

    with pytest.raises(EngineError, match="no ONNX node named '/no/such/Conv'") as info:
        keep.ops_of_onnx_nodes(model, source, ["/no/such/Conv", "/stem/Conv"])
    assert "\n" not in str(info.value)


@needs_bf16
def test_bf16_engine_keeps_a_convolution_in_f32_and_says_what_it_could_not_keep(tiny_onnx, tmp_path):
    prepared = prepare_graph("openvino", tiny_onnx, tmp_path / "work", "bf16", keep_fp32=[KEPT_CONV, LINEAR])
    assert prepared.path == tmp_path / "work" / OPENVINO16_DIR / "tiny_mtl.xml" and prepared.is_ir
    assert sorted(prepared.metadata["fp32_nodes"]) == sorted([KEPT_CONV, LINEAR])

    artifact = ov_backend.build(prepared.path, tmp_path / "out", precision="bf16", metadata=prepared.metadata)
    assert artifact.precision_executed == "bf16"
    proof = artifact.metadata["kept_fp32"]
    assert sorted(proof["asked"]) == sorted([KEPT_CONV, LINEAR])
    assert proof["ran_f32"] == [KEPT_CONV]
    # A Linear layer (MatMul + bias) is fused into one FullyConnected, which drops the mark: it runs
    # bf16, and the sidecar and the notes say so rather than claiming it was kept.
    assert [layer["layer_type"] for layer in proof["not_f32"][LINEAR]] == ["FullyConnected"]
    assert proof["not_f32"][LINEAR][0]["precision"] == "bf16"
    assert any(note.startswith(f"1 of 2 kept node(s) still ran bf16 on CPU ({LINEAR}") for note in artifact.notes)

    # What runs, read from the runtime graph of the engine as loaded: from the blob and recompiled from
    # the IR (the marks live in the engine's IR), the kept head's Convolution runs an f32 kernel while
    # the other head's runs bf16.
    for use_blob in (True, False):
        with ov_backend.load(artifact.path, use_blob=use_blob) as runner:
            kept_layers = runtime_layers_of(runner.compiled, f"{KEPT_CONV}/WithoutBiases")
            other_layers = runtime_layers_of(runner.compiled, f"{OTHER_CONV}/WithoutBiases")
        assert [(la["layer_type"], la["precision"]) for la in kept_layers] == [("Convolution", "f32")], use_blob
        assert kept_layers[0]["kernel"].endswith("_f32")
        assert [(la["layer_type"], la["precision"]) for la in other_layers] == [("Convolution", "bf16")], use_blob


@needs_bf16
def test_the_proof_reports_a_node_that_ran_bf16(tiny_onnx):
    # Without the mark the same head runs bf16, and prove_kept says so: the proof is not a formality.
    core = ov.Core()
    model = ov.convert_model(str(tiny_onnx))
    kept = keep.ops_of_onnx_nodes(model, load_onnx(tiny_onnx), [KEPT_CONV])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    proof = keep.prove_kept(compiled, model, kept)
    assert proof["ran_f32"] == [] and [la["precision"] for la in proof["not_f32"][KEPT_CONV]] == ["bf16"]


@needs_f16
def test_f16_keeping_every_node_gives_the_fp32_results(tiny_onnx, tmp_path, test_batch, reference):
    every_node = [node.name for node in load_onnx(tiny_onnx).graph.node]
    kept_run, model, kept = compile_marked(tiny_onnx, tmp_path, every_node, "f16")
    proof = keep.prove_kept(kept_run, model, kept)
    assert proof["not_f32"] == {} and len(proof["ran_f32"]) > 30, proof
    plain = ov.Core().compile_model(ov.convert_model(str(tiny_onnx)), "CPU", {"INFERENCE_PRECISION_HINT": "f16"})
    kept_error = max(relative_error(infer(kept_run, test_batch), reference).values())
    plain_error = max(relative_error(infer(plain, test_batch), reference).values())
    # f16 rounds at about 5e-4; kept in f32 end to end (the outputs' Results are marked too, or the
    # last layer's values would be rounded to f16 on the way out) the engine matches fp32.
    assert plain_error > 1e-4 and kept_error < 1e-5, (plain_error, kept_error)


def test_fp16_build_keeps_the_kept_weights_fp32_and_counts_kept_nodes_per_format(tiny_onnx, tmp_path):
    prepared = prepare_graph("openvino", tiny_onnx, tmp_path / "work", "fp16", keep_fp32=["/heads.*/Conv"])
    artifact = ov_backend.build(
        prepared.path, tmp_path / "out", precision="fp16", metadata=prepared.metadata, export_blob=False
    )
    selection = artifact.metadata["inference_precision_selection"]
    assert selection["kept_asked"] == 2 and selection["kept_f32"]["f32"] == 2
    if "FP16" in CAPABILITIES:
        assert selection["kept_f32"]["f16"] == 2  # f16 keeps what it is asked to
    assert sorted(artifact.metadata["kept_fp32"]["ran_f32"]) == [KEPT_CONV, OTHER_CONV]
    # The engine's IR compresses weights to fp16, except those of kept nodes.
    engine = ov.Core().read_model(str(artifact.path))
    weights = {
        tuple(op.get_output_shape(0)): op.get_output_element_type(0).get_type_name()
        for op in engine.get_ops()
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) == 4 and op.get_output_shape(0)[0] > 1
    }
    assert weights[(5, 16, 1, 1)] == "f32" and weights[(16, 3, 4, 4)] == "f16", weights  # heads.0 kept, stem not


def test_build_marks_an_onnx_itself_and_refuses_what_it_cannot_keep(tiny_onnx, tmp_path):
    artifact = ov_backend.build(tiny_onnx, tmp_path, precision="bf16", export_blob=False, keep_fp32=[KEPT_CONV])
    assert artifact.metadata["kept_fp32"]["ran_f32"] == [KEPT_CONV]

    with pytest.raises(EngineError, match="no ONNX node named '/heads.9/Conv'") as info:
        ov_backend.build(tiny_onnx, tmp_path, precision="bf16", export_blob=False, keep_fp32=["/heads.9/Conv"])
    assert "\n" not in str(info.value)
    with pytest.raises(EngineError, match="for int8 keep the nodes when quantizing"):
        ov_backend.build(tiny_onnx, tmp_path, precision="int8", keep_fp32=[KEPT_CONV])
    prepared = prepare_graph("openvino", tiny_onnx, tmp_path / "work", "bf16", keep_fp32=[KEPT_CONV])
    with pytest.raises(EngineError, match=f"does not keep '{OTHER_CONV}' in fp32"):
        ov_backend.build(prepared.path, tmp_path, precision="bf16", keep_fp32=[OTHER_CONV])
    # Globs are checked against every graph of a model upstream; one graph may hold none of them.
    assert prepare_graph("openvino", tiny_onnx, tmp_path / "none", "bf16", keep_fp32=["/nowhere/*"]).path == tiny_onnx


def test_without_keep_openvino_16_bit_is_as_before(tiny_onnx, tmp_path):
    prepared = prepare_graph("openvino", tiny_onnx, tmp_path, "bf16")
    assert prepared.path == tiny_onnx and not (tmp_path / OPENVINO16_DIR).exists()
    artifact = ov_backend.build(prepared.path, tmp_path, precision="bf16", export_blob=False)
    assert "kept_fp32" not in artifact.metadata
    assert not any(keep.MARK_KEY in op.get_rt_info() for op in ov.Core().read_model(str(artifact.path)).get_ops())
