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


def test_default_model_graphs_lint_clean_for_every_tensorrt_version(tmp_path):
    from calibration.data import CalibrationSet
    from calibration.prepare import prepare_graph
    from export.onnx.exporter import export_checkpoint
    from export.pipeline.sources import DEFAULT_MODEL

    export = export_checkpoint(DEFAULT_MODEL, tmp_path / "export", reference_samples=0)
    graph = export.paths[0]
    size = int(export.input_shape[-1])
    images = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    fp16 = prepare_graph("tensorrt", graph, tmp_path / "work", "fp16").path
    int8 = prepare_graph("tensorrt", graph, tmp_path / "work", "int8",
                         calibration=CalibrationSet.from_arrays(images, input_name="image")).path
    result = CliRunner().invoke(export_cli, ["lint", str(graph), str(fp16), str(int8)])
    assert result.exit_code == 0, result.output
    assert "3 graph(s) checked for tensorrt-10.3, tensorrt-10.13, tensorrt-11: clean" in result.output


def test_lint_exits_1_with_one_line_per_finding(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["y"], name="unique")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = CliRunner().invoke(export_cli, ["lint", str(path), "--target", "tensorrt-11"])
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
    assert any(name.startswith("graphs/") for name in verdicts)
    for per_target in verdicts.values():
        assert set(per_target) == {"tensorrt-10.3", "tensorrt-10.13", "tensorrt-11"}
        assert all(v["clean"] for v in per_target.values()), per_target
    index = json.loads((ort_bundle / "bundle.json").read_text())
    graphs = {f for f in index["files"] if f.endswith(".onnx") and f.startswith(("export/", "graphs/"))}
    assert set(index["tensorrt_lint"]) == graphs and len(graphs) >= 3  # model, its fp16 and Q/DQ graphs
