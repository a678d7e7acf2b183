"""TensorRT's int8 graph: the Q/DQ graph with everything outside the Q/DQ pairs in fp16 (calibration.qdq_fp16).

Checked without TensorRT: valid ONNX (onnx.checker, full check), the structure a strongly typed
network needs (float16 scales, symmetric int8, sensitive ops behind Casts to fp32), clean for the
lint, and close to the fp32 model when ONNX Runtime runs it on the CPU.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, numpy_helper

from calibration.errors import CalibrationError
from calibration.fp16 import check_fp16_graph
from calibration.prepare import prepare_graph
from calibration.qdq_fp16 import QDQ_FP16_OPSET, to_qdq_fp16_graph
from engines.onnxruntime.runner import create_session
from engines.tensorrt.lint import lint_targets
from tests.engine_fixtures import relative_error

# The shared fixtures: tiny_onnx, test_batch, reference, calibration_set, qdq_onnx.
pytest_plugins = ("tests.engine_fixtures",)


@pytest.fixture(scope="module")
def qdq_fp16(qdq_onnx, tmp_path_factory):
    return to_qdq_fp16_graph(qdq_onnx, tmp_path_factory.mktemp("qdq_fp16") / "tiny.qdq_fp16.onnx")


def run(path, batch):
    session = create_session(path, ["CPUExecutionProvider"])  # int8 as the graph says, on any CPU (`exact_int8`)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": batch}), strict=True))


def test_it_is_valid_onnx_at_opset_19_with_float16_scales(qdq_fp16, qdq_onnx):
    model = onnx.load(str(qdq_fp16))
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == QDQ_FP16_OPSET
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    before = [n for n in onnx.load(str(qdq_onnx)).graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == len(before) > 0  # the same Q/DQ pairs: quantization is not redone
    for node in qdq:
        assert initializers[node.input[1]].dtype == np.float16, node.name
        assert initializers[node.input[2]].dtype == np.int8 and not initializers[node.input[2]].any(), node.name
    # The graph's inputs and outputs stay float32, like the fp32 model's.
    assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} == {TensorProto.FLOAT}


def test_sensitive_ops_stay_fp32_and_the_rest_is_fp16(qdq_fp16):
    model = onnx.load(str(qdq_fp16))
    assert check_fp16_graph(model) == []  # LayerNorm, Softmax, Erf and the output layers in fp32, behind Casts
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    kinds = collections.Counter()
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Add", "LayerNormalization", "Softmax", "Erf"):
            kinds[node.op_type, types.get(node.input[0])] += 1
    assert kinds["LayerNormalization", TensorProto.FLOAT] == 2 and kinds["Softmax", TensorProto.FLOAT] == 1
    assert kinds["Erf", TensorProto.FLOAT] == 1
    assert kinds["MatMul", TensorProto.FLOAT16] >= 4  # the quantized projections compute in fp16 around int8
    assert kinds["Add", TensorProto.FLOAT16] >= 2  # the residual adds too (the fp32 Q/DQ graph kept them fp32)


def test_it_lints_clean_and_matches_the_fp32_model(qdq_fp16, qdq_onnx, test_batch, reference):
    for target, findings in lint_targets(qdq_fp16).items():
        assert findings == [], (target, findings)
    outputs = run(qdq_fp16, test_batch)
    fp32_qdq = run(qdq_onnx, test_batch)
    assert max(relative_error(outputs, reference).values()) < 0.06  # what the TensorRT int8 engine test allows
    # fp16 around the same int8 pairs changes the result by about fp16's rounding, not int8's.
    assert max(relative_error(outputs, fp32_qdq).values()) < 0.02


def test_prepare_graph_makes_it_for_tensorrt_int8(tiny_onnx, calibration_set, tmp_path, test_batch, reference):
    prepared = prepare_graph("tensorrt", tiny_onnx, tmp_path, "int8", calibration=calibration_set, keep_fp32=["*/fc2/*"])
    assert prepared.path == tmp_path / "qdq_fp16" / "tiny_mtl.onnx"
    meta = prepared.metadata
    assert meta["int8_graph"] == "qdq_fp16" and meta["qdq_fp32_onnx"] == str(tmp_path / "qdq" / "tiny_mtl.onnx")
    assert meta["calibration_samples"] == 16 and "/fc2/MatMul" in meta["fp32_nodes"]
    assert max(relative_error(run(prepared.path, test_batch), reference).values()) < 0.06


def test_a_graph_without_qdq_is_refused(tiny_onnx, tmp_path):
    with pytest.raises(CalibrationError, match="has no QuantizeLinear/DequantizeLinear nodes"):
        to_qdq_fp16_graph(tiny_onnx, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# ----------------------------------------------------------------------------- unit normals in fp16 graphs


def _normals_graph(path):
    """x -> Conv -> x / expand(clip(ReduceL2(x, channels))): the in-graph normalisation --postprocess exports."""
    from onnx import helper

    weight = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "w")
    eps = numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps")
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["raw"], name="normals/conv"),
        helper.make_node("ReduceL2", ["raw"], ["norm"], name="norm", axes=[1], keepdims=1),
        helper.make_node("Clip", ["norm", "eps", ""], ["clipped"], name="clip"),
        helper.make_node("Shape", ["raw"], ["shape"], name="shape"),
        helper.make_node("Expand", ["clipped", "shape"], ["divisor"], name="expand"),
        helper.make_node("Div", ["raw", "divisor"], ["normals"], name="div"),
    ]
    graph = helper.make_graph(nodes, "normals", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("normals", TensorProto.FLOAT, [1, 3, 2, 2])], [weight, eps])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("keep_output_layers", [True, False])
def test_large_normals_stay_unit_length_in_the_fp16_graph(tmp_path, keep_output_layers):
    # A raw normal above about 148 per channel squares past fp16's 65504: ReduceL2 in fp16 gives inf and
    # the normal 0. The norm's ReduceL2/Clip/Expand run in fp32 (a sensitive op, and part of the output layer).
    from calibration.fp16 import to_fp16_graph

    source = _normals_graph(tmp_path / "normals.onnx")
    fp16 = to_fp16_graph(source, tmp_path / "fp16" / "normals.onnx", keep_output_layers=keep_output_layers)
    raw = np.full((1, 3, 2, 2), 1000.0, dtype=np.float32)
    raw[0, :, 0, 0] = (300.0, -400.0, 1200.0)
    normals = run(fp16, raw)["normals"]
    assert np.all(np.isfinite(normals))
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(normals[0, :, 0, 0], np.array([3, -4, 12]) / 13, atol=1e-3)
    from calibration.fp16 import tensor_types

    model = onnx.load(str(fp16))
    types = tensor_types(model)
    # The whole divisor with the output layer; without output layers, ReduceL2 itself (a sensitive op).
    kept = ("ReduceL2", "Clip", "Expand") if keep_output_layers else ("ReduceL2",)
    for node in model.graph.node:
        if node.op_type in kept:
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
    assert lint_targets(fp16)["tensorrt-11.0"] == []


def test_uint8_class_ids_are_cast_through_float32(tmp_path):
    # ONNX Runtime's quantization pre-processing fuses the exporter's ArgMax -> Cast(FLOAT) -> Cast(UINT8) into
    # one Cast from INT64, which TensorRT's UINT8 rule refuses; prepared graphs get the float step back.
    from onnx import helper

    from calibration.fp16 import cast_uint8_through_float

    nodes = [helper.make_node("ArgMax", ["logits"], ["ids64"], name="argmax", axis=1, keepdims=0),
             helper.make_node("Cast", ["ids64"], ["semseg"], name="cast", to=TensorProto.UINT8)]
    graph = helper.make_graph(nodes, "ids", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 21, 2, 2])],
                              [helper.make_tensor_value_info("semseg", TensorProto.UINT8, [1, 2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert lint_targets(model)["tensorrt-10.3"] and cast_uint8_through_float(model) == 1
    assert cast_uint8_through_float(model) == 0  # already through float
    onnx.checker.check_model(model, full_check=True)
    assert all(findings == [] for findings in lint_targets(model).values())
    path = tmp_path / "ids.onnx"
    onnx.save(model, str(path))
    logits = np.random.default_rng(0).standard_normal((1, 21, 2, 2)).astype(np.float32)
    ids = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"logits": logits})[0]
    assert ids.dtype == np.uint8 and np.array_equal(ids, logits.argmax(axis=1).astype(np.uint8))
