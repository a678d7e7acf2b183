"""The README's Python API example, run exactly as written (in a directory laid out like the repository
after `make demo`), and the `Engine` it shows: both layouts, the torch-free promise, and its errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from export import open_engine
from export.cli import main as export_cli
from export.errors import ExportError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "upstream-mtlora-tiny" / "checkpoint.pth"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example:.*?-->\n```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its Python API example"
    return block.group(1)


def test_the_readme_example_runs_as_written(ort_build, tmp_path):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 14  # "about ten lines"
    # The paths the example names, as they are after `make demo` in the repository root.
    engines = tmp_path / "build" / "demo" / "engines"
    engines.mkdir(parents=True)
    shutil.copytree(ort_build / "engines" / "onnxruntime-fp32", engines / "onnxruntime-fp32")
    (tmp_path / "mtlora" / "assets").mkdir(parents=True)
    shutil.copy(ROOT / "mtlora" / "assets" / "example.png", tmp_path / "mtlora" / "assets")
    # A fresh interpreter that cannot import torch: the API is torch-free.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip()
    assert out.startswith("('semseg', 'human_parts', 'sal', 'normals') (64, 64)"), out
    assert "'semseg': (2, 21, 64, 64)" in out and "'normals': (2, 3, 64, 64)" in out


def test_engine_predict_matches_the_command_line_run(ort_build, tmp_path):
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(ROOT / "mtlora/assets/example.png").convert("RGB"))
    with open_engine(ort_build / "engines" / "onnxruntime-fp32", threads=1) as engine:
        outputs = engine.predict(image)
        assert engine.precision_executed == "fp32"
    out = tmp_path / "pred.npz"
    result = CliRunner().invoke(export_cli, ["run", str(ort_build / "engines" / "onnxruntime-fp32"),
                                             "--image", str(ROOT / "mtlora/assets/example.png"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out) as stored:
        for task, value in outputs.items():
            np.testing.assert_allclose(value, stored[task][0], atol=1e-5)


def test_split_engine_sets_open_the_same_way(tmp_path):
    out = tmp_path / "split"
    result = CliRunner().invoke(export_cli, ["build", str(FIXTURE), "--backend", "onnxruntime", "--precision",
                                             "fp32", "--layout", "split", "--eval-samples", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with open_engine(out / "engines" / "onnxruntime-fp32") as engine:
        assert engine.entry.layout == "split"
        outputs = engine.infer(batch)
    assert list(outputs) == ["semseg", "human_parts", "sal", "normals"]
    assert outputs["human_parts"].shape == (2, 7, 64, 64)


def test_engine_errors_are_one_line(ort_build, tmp_path):
    with pytest.raises(ExportError, match="not an engine directory"):
        open_engine(tmp_path)
    engine = open_engine(ort_build / "engines" / "onnxruntime-fp32")
    with pytest.raises(ExportError, match="not open"):
        engine.infer(np.zeros((1, 3, 64, 64), np.float32))
    with engine, pytest.raises(ExportError, match=r"one \(H, W, 3\) uint8 RGB image"):
        engine.predict(np.zeros((3, 64, 64), np.float32))


def test_a_split_runner_that_cannot_start_a_head_leaves_nothing_running(ort_build, tmp_path):
    from engines.errors import EngineError
    from engines.onnxruntime.runner import OnnxRuntimeRunner
    from export.artifacts.engineset import SplitRunner

    backbone = OnnxRuntimeRunner(ort_build / "engines" / "onnxruntime-fp32" / "model.fp32.onnx")
    broken = tmp_path / "head.onnx"
    broken.write_bytes(b"not an onnx file")
    split = SplitRunner(backbone, {"semseg": OnnxRuntimeRunner(broken)})
    with pytest.raises(EngineError):
        split.activate()
    assert not backbone.is_active and not split.is_active
    # A Runner like any other: inactive, it refuses to run; its feed is checked against the backbone's inputs.
    with pytest.raises(EngineError, match="not active"):
        split.infer({"image": np.zeros((1, 3, 64, 64), np.float32)})
