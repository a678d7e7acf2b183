"""`mtlora-export lint` and the lint verdicts a build and a bundle record: the embedded default model's
fp16 and int8 graphs, as the TensorRT backend would build from them, lint clean for every target."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper

from export.cli import main as export_cli

pytest_plugins = ("tests.engine_fixtures",)


ALL = "tensorrt-10.3, tensorrt-10.13, tensorrt-11.0, tensorrt-11.5"


def test_default_model_graphs_lint_clean_for_every_tensorrt_version(tmp_path):
    # What a build with --precision fp16 --precision int8 --postprocess writes (export, then each graph as
    # calibration.prepare makes it for ONNX Runtime and for TensorRT), linted as a user would lint them.
    from calibration.data import CalibrationSet
    from calibration.prepare import prepare_graph
    from export.onnx.exporter import export_checkpoint
    from export.pipeline.sources import DEFAULT_MODEL

    export = export_checkpoint(DEFAULT_MODEL, tmp_path / "export", reference_samples=0, postprocess=True)
    graph = export.paths[0]
    size = int(export.input_shape[-1])
    images = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    calibration = CalibrationSet.from_arrays(images, input_name="image")
    graphs = tmp_path / "graphs"
    ort_fp16 = prepare_graph("onnxruntime", graph, graphs / "onnxruntime-fp16", "fp16").path
    ort_int8 = prepare_graph("onnxruntime", graph, graphs / "onnxruntime-int8", "int8", calibration=calibration).path
    signed = graphs / "onnxruntime-int8" / "qdq" / graph.name
    # TensorRT's int8 graph from the same calibration (as a device builds it from a bundle's Q/DQ graph)
    trt_int8 = prepare_graph("tensorrt", graph, graphs / "tensorrt-int8", "int8", qdq_onnx=signed).path
    sibling = graphs / "onnxruntime-int8" / "qdq_fp16" / graph.name
    assert ort_int8.parent.name == "qdq_u8" and signed.is_file() and sibling.is_file()

    # Every graph TensorRT takes: clean for every release it is meant for.
    tensorrt_graphs = [graph, ort_fp16, sibling, trt_int8]
    result = CliRunner().invoke(export_cli, ["lint", *map(str, tensorrt_graphs)])
    assert result.exit_code == 0, result.output
    assert f"4 graph(s) checked for {ALL}: clean" in result.output
    # The signed fp32 Q/DQ graph: clean for TensorRT 10, whose weak typing takes it; one line for 11.
    result = CliRunner().invoke(export_cli, ["lint", str(signed)])
    assert result.exit_code == 0, result.output
    assert f"{signed}: not meant for tensorrt-11.0, tensorrt-11.5" in result.output
    assert f"TensorRT 11 takes {sibling}" in result.output
    # ONNX Runtime's uint8 Q/DQ graph: one line naming TensorRT's graphs of the same build, exit 3.
    result = CliRunner().invoke(export_cli, ["lint", str(ort_int8)])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(str(ort_int8))]
    assert len(lines) == 1 and f"not meant for {ALL}: ONNX Runtime's uint8-activation Q/DQ graph" in lines[0]
    assert f"TensorRT 10 takes {signed}" in lines[0] and f"TensorRT 11 takes {sibling}" in lines[0]
    assert "[quantization]" not in result.output
    # All at once: no finding, one graph meant for no target -> 3; --target names the release asked about.
    everything = CliRunner().invoke(export_cli, ["lint", *map(str, [*tensorrt_graphs, signed, ort_int8])])
    assert everything.exit_code == 3, everything.output
    assert CliRunner().invoke(export_cli, ["lint", str(signed), "--target", "tensorrt-11.5"]).exit_code == 3
    assert CliRunner().invoke(export_cli, ["lint", str(signed), "--target", "tensorrt-10.3"]).exit_code == 0


def test_lint_exits_1_with_one_line_per_finding(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["y"], name="unique")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = CliRunner().invoke(export_cli, ["lint", str(path), "--target", "tensorrt-11.0"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith(str(path))]
    assert lines and all("unique (Unique)" in line for line in lines)
    assert any("[operator]" in line for line in lines)
    bad_target = CliRunner().invoke(export_cli, ["lint", str(path), "--target", "tensorrt-9"])
    assert bad_target.exit_code == 2


def test_build_and_bundle_record_the_lint_verdict(ort_build, ort_bundle):
    record = json.loads((ort_build / "build.json").read_text())
    verdicts = record["tensorrt_lint"]
    assert "export/model.onnx" in verdicts
    targets = {"tensorrt-10.3", "tensorrt-10.13", "tensorrt-11.0", "tensorrt-11.5"}
    u8 = [name for name in verdicts if "/qdq_u8/" in name]
    signed = [name for name in verdicts if "/qdq/" in name]
    assert u8 and signed and any("/qdq_fp16/" in name for name in verdicts)
    for name, per_target in verdicts.items():
        assert set(per_target) == targets, name
        meant = {t for t, v in per_target.items() if v["clean"] is not None}
        expected = set() if name in u8 else {"tensorrt-10.3", "tensorrt-10.13"} if name in signed else targets
        assert meant == expected, name
        assert all(per_target[t]["clean"] for t in meant), per_target
        assert all("not meant for" in per_target[t]["not_for"] for t in targets - meant)
    index = json.loads((ort_bundle / "bundle.json").read_text())
    graphs = {f for f in index["files"] if f.endswith(".onnx") and f.startswith(("export/", "graphs/"))}
    assert set(index["tensorrt_lint"]) == graphs and len(graphs) >= 3  # model, its fp16 and Q/DQ graphs
