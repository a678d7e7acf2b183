"""engines.tensorrt.lint: ONNX graphs checked against TensorRT's parser tables and strongly typed rules,
without TensorRT. Bad graphs are built node by node; the tiny model's real graphs must lint clean."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.fp16 import KEPT_OP_TYPES_KEY, SENSITIVE_FP16_OPS
from calibration.prepare import prepare_graph
from engines.errors import EngineError
from engines.tensorrt.lint import (
    FP16_KEPT_OP_TYPES_KEY,
    TARGETS,
    Finding,
    format_findings,
    lint_graph,
    lint_targets,
    operator_table,
    summary,
)
from engines.tensorrt.lint import SENSITIVE_FP16_OPS as LINT_SENSITIVE_OPS

# The shared fixtures: tiny_onnx, test_batch, reference, calibration_set, qdq_onnx.
pytest_plugins = ("tests.engine_fixtures",)


def model(nodes, inputs, outputs, initializers=(), opset=17, metadata=None):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def tensor(name, elem_type=TensorProto.FLOAT, shape=(1, 4)):
    return helper.make_tensor_value_info(name, elem_type, None if shape is None else list(shape))


def rules(findings):
    return [(f.node, f.rule) for f in findings]


# ----------------------------------------------------------------------------- the three findings of the issue


def test_an_unsupported_op_is_reported():
    graph = model(
        [helper.make_node("Unique", ["x"], ["y"], name="unique"), helper.make_node("Relu", ["y"], ["z"], name="relu")],
        [tensor("x")],
        [tensor("z", shape=None)],
    )
    for target in TARGETS:
        findings = lint_graph(graph, target)
        assert ("unique", "operator") in rules(findings)
        unique = next(f for f in findings if f.rule == "operator")
        assert unique.op == "Unique" and "is not supported by the TensorRT" in unique.message
        assert ("unique", "data-dependent") in rules(findings)  # its output shape depends on the values
        assert not any(f.node == "relu" for f in findings)
    custom = model([helper.make_node("FusedGelu", ["x"], ["y"], name="gelu", domain="com.microsoft")], [tensor("x")], [tensor("y")])
    assert rules(lint_graph(custom, "tensorrt-11.0")) == [("gelu", "operator")]


def test_an_asymmetric_qdq_pair_is_reported():
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(5, np.int8), "zero")
    graph = model(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["y"], name="dq"),
        ],
        [tensor("x")],
        [tensor("y")],
        [scale, zero],
    )
    for target in TARGETS:
        findings = lint_graph(graph, target)
        assert rules(findings) == [("q", "quantization"), ("dq", "quantization")], format_findings(findings)
        assert all("not 0 (asymmetric quantization)" in f.message for f in findings)
    # uint8 (ONNX's default when the zero point is left out) is not a type TensorRT quantizes to.
    unsigned = model([helper.make_node("QuantizeLinear", ["x", "scale"], ["xq"], name="q")], [tensor("x")],
                     [tensor("xq", TensorProto.UINT8)], [scale])
    assert any("quantizes to UINT8" in f.message for f in lint_graph(unsigned, "tensorrt-10.3"))


def test_an_int64_tensor_where_tensorrt_refuses_one_is_reported():
    graph = model(
        [helper.make_node("MatMul", ["a", "b"], ["c"], name="matmul")],
        [tensor("a", TensorProto.INT64, (2, 3)), tensor("b", TensorProto.INT64, (3, 2))],
        [tensor("c", TensorProto.INT64, (2, 2))],
    )
    for target in TARGETS:
        findings = lint_graph(graph, target)
        assert rules(findings) == [("matmul", "type"), ("matmul", "type")]
        assert "input 0 'a' is INT64" in findings[0].message and "FP32, FP16, BF16" in findings[0].message
    # Per release: integer Pow came with TensorRT 10.8 (the 10.13 and 11 tables list INT64, 10.3's does not).
    power = model(
        [helper.make_node("Pow", ["a", "b"], ["c"], name="pow")],
        [tensor("a", TensorProto.INT64), tensor("b", TensorProto.INT64)],
        [tensor("c", TensorProto.INT64)],
    )
    assert {t: bool(f) for t, f in lint_targets(power).items()} == {
        "tensorrt-10.3": True, "tensorrt-10.13": False, "tensorrt-11.0": False, "tensorrt-11.5": False}
    # DOUBLE is clamped to FP32 by every parser; it is a finding wherever it appears.
    double = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x", TensorProto.DOUBLE)],
                   [tensor("y", TensorProto.DOUBLE)])
    assert ("relu", "type") in rules(lint_graph(double, "tensorrt-11.0"))


# ----------------------------------------------------------------------------- the other rules


def test_per_channel_scales_only_on_weights_along_the_output_channels():
    weight = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")  # MatMul (K, N): channels on axis 1
    per_channel = numpy_helper.from_array(np.full(3, 0.1, np.float32), "s3")
    per_row = numpy_helper.from_array(np.full(4, 0.1, np.float32), "s4")
    zero3 = numpy_helper.from_array(np.zeros(3, np.int8), "z3")
    zero4 = numpy_helper.from_array(np.zeros(4, np.int8), "z4")

    def matmul(axis, scale, zero):
        return model(
            [helper.make_node("DequantizeLinear", ["w", scale, zero], ["wf"], name="dq_w", axis=axis),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="matmul")],
            [tensor("x", shape=(2, 4))], [tensor("y", shape=(2, 3))], [weight, per_channel, per_row, zero3, zero4],
        )

    assert lint_graph(matmul(1, "s3", "z3"), "tensorrt-10.3") == []
    wrong = lint_graph(matmul(0, "s4", "z4"), "tensorrt-10.3")
    assert rules(wrong) == [("dq_w", "quantization")] and "not the output-channel axis 1" in wrong[0].message
    activation = model(
        [helper.make_node("QuantizeLinear", ["x", "s4", "z4"], ["xq"], name="q_x", axis=1),
         helper.make_node("DequantizeLinear", ["xq", "s4", "z4"], ["y"], name="dq_x", axis=1)],
        [tensor("x", shape=(2, 4))], [tensor("y", shape=(2, 4))], [per_row, zero4],
    )
    findings = lint_graph(activation, "tensorrt-11.0")
    assert rules(findings) == [("q_x", "quantization"), ("dq_x", "quantization")]
    assert all("per-channel scales (4) on activation" in f.message for f in findings)


def test_computed_scales_and_fp4_per_release():
    computed = model(
        [helper.make_node("Abs", ["x"], ["s"], name="abs"),
         helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q", output_dtype=TensorProto.INT8)],
        [tensor("x", shape=())], [tensor("xq", TensorProto.INT8, ())], opset=21,
    )
    findings = lint_graph(computed, "tensorrt-11.0")
    assert rules(findings) == [("q", "quantization")] and "computed" in findings[0].message
    assert ("", "opset") in rules(lint_graph(computed, "tensorrt-10.3"))  # opset 21 > 20
    assert operator_table("tensorrt-10.3")["quantized_types"] == ["INT8", "FP8", "INT4"]
    assert "FP4" in operator_table("tensorrt-10.13")["quantized_types"]


def test_control_flow_and_data_dependent_shapes():
    graph = model([helper.make_node("NonZero", ["x"], ["idx"], name="nonzero")], [tensor("x")],
                  [tensor("idx", TensorProto.INT64, None)])
    findings = lint_graph(graph, "tensorrt-10.13")
    assert rules(findings) == [("nonzero", "data-dependent")] and "depends on the input values" in findings[0].message


def test_strongly_typed_rules():
    exponent = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    mixed = model([helper.make_node("Pow", ["x", "two"], ["y"], name="pow")], [tensor("x", TensorProto.FLOAT16)],
                  [tensor("y", TensorProto.FLOAT16)], [exponent])
    findings = lint_graph(mixed, "tensorrt-11.0")
    assert ("pow", "strong-typing") in rules(findings)
    assert any("different types (FP16, FP32)" in f.message for f in findings)
    # An fp16 graph whose LayerNormalization computes in fp16: a strongly typed network runs it so.
    weight = numpy_helper.from_array(np.ones((4, 4), np.float16), "w")
    scale = numpy_helper.from_array(np.ones(4, np.float16), "gamma")
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], name="cast_in", to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["xh", "w"], ["h"], name="matmul"),
        helper.make_node("LayerNormalization", ["h", "gamma"], ["n"], name="norm", axis=-1),
        helper.make_node("Cast", ["n"], ["y"], name="cast_out", to=TensorProto.FLOAT),
    ]
    half_norm = model(nodes, [tensor("x")], [tensor("y")], [weight, scale])
    findings = lint_graph(half_norm, "tensorrt-10.3")
    assert rules(findings) == [("norm", "strong-typing")] and "Cast its inputs to FP32" in findings[0].message
    # What the graph records as kept in fp32 is what is checked: not kept, not a finding.
    recorded = model(nodes, [tensor("x")], [tensor("y")], [weight, scale], metadata={FP16_KEPT_OP_TYPES_KEY: json.dumps(["Softmax"])})
    assert lint_graph(recorded, "tensorrt-10.3") == []


def test_attribute_rules_and_opset_range():
    sizes = numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "sizes")
    cubic = model([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="resize", mode="cubic")],
                  [tensor("x", shape=(1, 4, 4, 4))], [tensor("y", shape=(1, 4, 8, 8))], [sizes], opset=19)
    findings = lint_graph(cubic, "tensorrt-11.0")
    assert rules(findings) == [("resize", "attribute")] and "mode=cubic" in findings[0].message
    new = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x")], [tensor("y")], opset=26)
    assert all(rules(f) == [("", "opset")] for f in lint_targets(new).values())


def test_findings_format_one_line_each():
    finding = Finding("/blocks.0/MatMul", "MatMul", "type", "input 0 'a' is INT64")
    assert finding.line() == "/blocks.0/MatMul (MatMul) [type] input 0 'a' is INT64"
    assert finding.line("tensorrt-11.0") == "tensorrt-11.0: /blocks.0/MatMul (MatMul) [type] input 0 'a' is INT64"
    assert Finding("", "", "opset", "x").line() == "<graph> (-) [opset] x"
    assert format_findings([finding, finding], "tensorrt-10.3").count("\n") == 1 and format_findings([]) == ""
    assert summary({"tensorrt-11.0": [finding], "tensorrt-10.3": []}) == {
        "tensorrt-11.0": {"clean": False, "findings": [finding.to_dict()]}, "tensorrt-10.3": {"clean": True, "findings": []}}
    with pytest.raises(EngineError, match="unknown lint target 'tensorrt-9'.*tensorrt-10.3"):
        lint_graph(model([], [tensor("x")], [tensor("x")]), "tensorrt-9")


def test_tables_and_rules_agree_with_the_graph_preparation():
    # The lint may not import calibration (engines imports nothing of ours); the lists must stay equal.
    assert LINT_SENSITIVE_OPS == SENSITIVE_FP16_OPS and FP16_KEPT_OP_TYPES_KEY == KEPT_OP_TYPES_KEY
    for target in TARGETS:
        table = operator_table(target)
        low, high = table["opset"]
        assert low == 9 and 20 <= high <= 25 and table["sources"]
        assert {"LayerNormalization", "MatMul", "Softmax", "Erf", "QuantizeLinear", "DequantizeLinear"} <= set(table["supported"])
        assert not set(table["supported"]) & set(table["unsupported"])
    assert "Attention" in operator_table("tensorrt-11.0")["supported"] and "Attention" not in operator_table("tensorrt-10.13")["supported"]


# ----------------------------------------------------------------------------- the tiny model's real graphs


def test_the_tiny_models_graphs_lint_clean_for_every_target(tiny_onnx, qdq_onnx, tmp_path):
    fp16 = prepare_graph("tensorrt", tiny_onnx, tmp_path, "fp16")
    int8 = prepare_graph("tensorrt", tiny_onnx, tmp_path, "int8", qdq_onnx=qdq_onnx)
    for graph in (tiny_onnx, fp16.path, qdq_onnx, int8.path):
        for target, findings in lint_targets(graph).items():
            assert findings == [], f"{graph.name} {target}:\n{format_findings(findings, target)}"
    # and the same graphs, made wrong in one place each, do not
    broken = onnx.load(str(int8.path))
    zero = next(i for i in broken.graph.initializer if i.data_type == TensorProto.INT8 and not i.dims)
    zero.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zero.name))
    assert any(f.rule == "quantization" for f in lint_graph(broken, "tensorrt-11.0"))


# ----------------------------------------------------------------------------- round three: the rules added


def test_opset_25_is_for_tensorrt_11_5_and_later_only():
    graph = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x")], [tensor("y")], opset=25)
    verdicts = {t: rules(f) for t, f in lint_targets(graph).items()}
    assert verdicts == {"tensorrt-10.3": [("", "opset")], "tensorrt-10.13": [("", "opset")],
                        "tensorrt-11.0": [("", "opset")], "tensorrt-11.5": []}
    opset24 = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x")], [tensor("y")], opset=24)
    assert lint_targets(opset24)["tensorrt-11.0"] == []


@pytest.mark.parametrize("source, to, flagged", [
    (TensorProto.INT64, TensorProto.UINT8, True),   # ArgMax -> Cast(UINT8): what --postprocess exported before
    (TensorProto.INT32, TensorProto.UINT8, True),
    (TensorProto.BOOL, TensorProto.UINT8, True),
    (TensorProto.FLOAT, TensorProto.UINT8, False),
    (TensorProto.FLOAT16, TensorProto.UINT8, False),
    (TensorProto.UINT8, TensorProto.INT32, True),
    (TensorProto.UINT8, TensorProto.FLOAT, False),
])
def test_uint8_converts_only_to_and_from_float(source, to, flagged):
    graph = model([helper.make_node("Cast", ["x"], ["y"], name="cast", to=to)], [tensor("x", source)], [tensor("y", to)])
    for target in TARGETS:
        assert (("cast", "uint8") in rules(lint_graph(graph, target))) is flagged, target


def test_topk_needs_a_constant_k_below_3840():
    def topk(k):
        inits = [numpy_helper.from_array(np.array([k], np.int64), "k")] if k is not None else []
        inputs = [tensor("x", shape=(1, 5000))] + ([] if k is not None else [tensor("k", TensorProto.INT64, (1,))])
        return model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")], inputs,
                     [tensor("v"), tensor("i", TensorProto.INT64)], inits)

    assert ("topk", "attribute") not in rules(lint_graph(topk(3839), "tensorrt-11.0"))
    assert ("topk", "attribute") in rules(lint_graph(topk(3840), "tensorrt-11.0"))
    computed = lint_graph(topk(None), "tensorrt-10.3")
    assert ("topk", "attribute") in rules(computed) and any("computed" in f.message for f in computed)


def test_resize_axes_must_be_every_axis_in_order():
    def resize(**attrs):
        scales = numpy_helper.from_array(np.array([2.0, 2.0], np.float32), "scales")
        return model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode="linear", **attrs)],
                     [tensor("x", shape=(1, 3, 4, 4))], [tensor("y", shape=(1, 3, 8, 8))], [scales], opset=19)

    assert ("resize", "attribute") in rules(lint_graph(resize(axes=[2, 3]), "tensorrt-11.0"))
    assert ("resize", "attribute") not in rules(lint_graph(resize(), "tensorrt-11.0"))


def test_argmax_select_last_index_is_reported():
    for op in ("ArgMax", "ArgMin"):
        for last, flagged in ((1, True), (0, False)):
            graph = model([helper.make_node(op, ["x"], ["y"], name="arg", axis=1, keepdims=0, select_last_index=last)],
                          [tensor("x", shape=(1, 4, 2))], [tensor("y", TensorProto.INT64, (1, 2))])
            assert (("arg", "attribute") in rules(lint_graph(graph, "tensorrt-10.13"))) is flagged, (op, last)


def test_reduce_l2_in_fp16_is_a_strong_typing_finding_in_an_fp16_graph():
    weight = numpy_helper.from_array(np.ones((4, 4), np.float16), "w")
    graph = model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                   helper.make_node("ReduceL2", ["h"], ["n"], name="norm", axes=[1], keepdims=1)],
                  [tensor("x", TensorProto.FLOAT16)], [tensor("n", TensorProto.FLOAT16, (1, 1))], [weight])
    assert ("norm", "strong-typing") in rules(lint_graph(graph, "tensorrt-11.0"))


# ----------------------------------------------------------------------------- which graph is for whom


def _purposed(path, engines, takes=None):
    from engines.graph_purpose import purpose_metadata

    graph = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x")], [tensor("y")],
                  metadata=purpose_metadata(engines, takes))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(path))
    return path


def test_a_graph_is_linted_only_for_the_releases_that_take_it(tmp_path):
    from engines.tensorrt.lint import lint_purpose

    build = tmp_path / "graphs" / "onnxruntime-int8"
    signed = _purposed(build / "qdq" / "model.onnx", ["openvino", "tensorrt-10"], {"tensorrt-11": "qdq_fp16"})
    u8 = _purposed(build / "qdq_u8" / "model.onnx", ["onnxruntime"], {"tensorrt-10": "qdq", "tensorrt-11": "qdq_fp16"})
    both = _purposed(build / "fp16" / "model.onnx", ["onnxruntime", "tensorrt"])

    assert set(lint_purpose(both).findings) == set(TARGETS) and lint_purpose(both).note == ""
    ten = lint_purpose(signed)
    assert set(ten.findings) == {"tensorrt-10.3", "tensorrt-10.13"} and ten.not_for == ("tensorrt-11.0", "tensorrt-11.5")
    assert "TensorRT 11 takes the fp16 Q/DQ graph (qdq_fp16/), which this build did not write" in ten.note
    ort = lint_purpose(u8)
    assert ort.findings == {} and ort.not_for == TARGETS and "\n" not in ort.note
    assert "ONNX Runtime's uint8-activation Q/DQ graph, for onnxruntime" in ort.note
    assert f"TensorRT 10 takes {signed}" in ort.note
    # Once the build has TensorRT's own int8 graph (another engine directory of the same build), it is named.
    trt_int8 = _purposed(tmp_path / "graphs" / "tensorrt-int8" / "qdq_fp16" / "model.onnx", ["tensorrt"])
    assert f"TensorRT 11 takes {trt_int8}" in lint_purpose(u8).note
    assert lint_purpose(u8).summary()["tensorrt-11.0"] == {"clean": None, "findings": [], "not_for": lint_purpose(u8).note}
    # A graph that records nothing is for every engine, as before.
    plain = tmp_path / "plain.onnx"
    onnx.save(model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x")], [tensor("y")]), str(plain))
    assert set(lint_purpose(plain).findings) == set(TARGETS)


# ----------------------------------------------------------------------------- DLA report


def test_the_dla_report_names_what_falls_back_per_head(tmp_path):
    from click.testing import CliRunner

    from engines.tensorrt.dla import dla_report
    from export.cli import main as export_cli

    weight = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float16), "w")
    mm = numpy_helper.from_array(np.ones((2, 2), np.float16), "m")
    head = model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                  helper.make_node("Relu", ["c"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["r", "m"], ["p"], name="mm"),
                  helper.make_node("Erf", ["p"], ["e"], name="erf"),
                  helper.make_node("MatMul", ["e", "m"], ["y"], name="mm2")],
                 [tensor("x", TensorProto.FLOAT16, (1, 4, 2, 2))], [tensor("y", TensorProto.FLOAT16, (1, 4, 2, 2))],
                 [weight, mm])
    report = dla_report(head, "head_semseg.onnx")
    assert (report.layers, report.on_dla) == (5, 2)
    assert report.fallback == {"MatMul": 2, "Erf": 1}
    line = report.line()
    assert line.startswith("head_semseg.onnx: DLA would run 2 of 5 layer(s); falls back to the GPU: 2 MatMul")
    assert "1 Erf (GELU's erf is a GPU-only unary)" in line and "\n" not in line
    # a dynamic batch or an fp32 graph: nothing runs on DLA, and the line says why
    dynamic = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x", shape=("batch", 4))],
                    [tensor("y", shape=("batch", 4))])
    dyn = dla_report(dynamic, "head.onnx")
    assert dyn.on_dla == 0 and "dynamic shapes on input(s) x" in dyn.line() and "an fp32 graph" in dyn.line()
    path = tmp_path / "head_semseg.onnx"
    onnx.save(head, str(path))
    result = CliRunner().invoke(export_cli, ["lint", "--dla", str(path)])
    assert f"{path}: DLA would run 2 of 5 layer(s)" in result.output
