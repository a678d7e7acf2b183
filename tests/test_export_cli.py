"""`mtlora-export merge` and `mtlora-export onnx` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from export.artifacts.manifest import verify_manifest
from export.cli import main
from mtlora.checkpoint import load_checkpoint, read_state, save_checkpoint
from tests.test_export_merge import FIXTURE, TOL, fixture_model, max_error, predict

CHECKPOINT = FIXTURE / "checkpoint.pth"
ort = pytest.importorskip("onnxruntime")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_failure(result, out, match: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert match in lines[0], lines[0]
    assert not out.exists()
    # Nothing half-written beside it either (staging directories are removed).
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def merged_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    result = invoke("merge", CHECKPOINT, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_merge_writes_a_merged_checkpoint(merged_checkpoint):
    out, output = merged_checkpoint
    assert "inference parameters:" in output and "->" in output and "MiB" in output
    assert read_state(out)["merged"] is True
    reference = dict(np.load(FIXTURE / "reference_io.npz"))
    model = load_checkpoint(out)
    assert max_error(predict(model, torch.from_numpy(reference["input"])), reference) <= TOL


def test_merge_refuses_an_already_merged_checkpoint(merged_checkpoint, tmp_path):
    out = tmp_path / "twice"
    assert_one_line_failure(invoke("merge", merged_checkpoint[0], "--out", out), out, "already merged")


def test_onnx_split_subset_end_to_end(tmp_path):
    out = tmp_path / "export"
    result = invoke("onnx", CHECKPOINT, "--out", out, "--layout", "split", "--tasks", "sal,semseg",
                    "--reference-samples", "3")
    assert result.exit_code == 0, result.output
    assert "exporting backbone.onnx" in result.output  # progress lines
    assert "full-rank MatMul weights" in result.output  # the cost breakdown
    assert sorted(p.name for p in out.iterdir()) == [
        "backbone.onnx", "head_sal.onnx", "head_semseg.onnx", "manifest.json", "reference.npz"]
    verify_manifest(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == ["semseg", "sal"] and manifest["layout"] == "split" and manifest["opset"] == 17
    assert manifest["input"]["shape"] == ["batch", 3, 64, 64]
    assert len(manifest["source"]["sha256"]) == 64
    for file in ("backbone.onnx", "head_sal.onnx", "head_semseg.onnx"):
        names = [i.name for i in onnx.load(str(out / file)).graph.initializer]
        assert not [n for n in names if "human_parts" in n or "normals" in n], file

    # The engines' check: the exported graphs reproduce reference.npz (the unmerged model).
    reference = dict(np.load(out / "reference.npz"))
    assert sorted(reference) == ["input", "sal", "semseg"] and reference["input"].shape[0] == 3
    providers = ["CPUExecutionProvider"]
    backbone = ort.InferenceSession(str(out / "backbone.onnx"), providers=providers)
    shared = dict(zip([o.name for o in backbone.get_outputs()], backbone.run(None, {"image": reference["input"]}),
                      strict=True))
    got = {}
    for task in ("semseg", "sal"):
        head = ort.InferenceSession(str(out / f"head_{task}.onnx"), providers=providers)
        got[task] = head.run(None, {i.name: shared[i.name] for i in head.get_inputs()})[0]
    assert max_error(got, reference) <= TOL
    expected = predict(fixture_model(), torch.from_numpy(reference["input"]))
    assert max_error({t: reference[t] for t in got}, expected) == 0.0


def test_onnx_from_a_merged_checkpoint_directory(merged_checkpoint, tmp_path):
    out = tmp_path / "export"
    result = invoke("onnx", merged_checkpoint[0], "--out", out, "--tasks", "normals", "--reference-samples", "1")
    assert result.exit_code == 0, result.output
    verify_manifest(out)
    reference = dict(np.load(out / "reference.npz"))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": reference["input"]}), strict=True))
    assert max_error(got, reference) <= TOL


def test_onnx_task_not_in_model(tmp_path):
    out = tmp_path / "export"
    result = invoke("onnx", CHECKPOINT, "--out", out, "--tasks", "semseg,depth")
    assert_one_line_failure(result, out, "depth")
    assert "semseg, human_parts, sal, normals" in result.output


def test_onnx_output_is_a_file(tmp_path):
    out = tmp_path / "export"
    out.write_text("not a directory")
    result = invoke("onnx", CHECKPOINT, "--out", out)
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1 and "not a directory" in result.output
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize("size", [72, 96])
def test_onnx_input_size_not_fitting(tmp_path, size):
    out = tmp_path / "export"
    assert_one_line_failure(invoke("onnx", CHECKPOINT, "--out", out, "--img-size", size), out, f"input size {size}")


def test_merge_output_is_a_file(tmp_path):
    out = tmp_path / "merged"
    out.write_text("x")
    result = invoke("merge", CHECKPOINT, "--out", out)
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert "not a directory" in result.output


def test_onnx_failure_leaves_no_output(tmp_path, monkeypatch):
    # A failure after the staging directory holds files leaves nothing behind.
    import export.onnx.exporter

    def failing_export(model, out_dir, **kwargs):
        (out_dir / "model.onnx").write_bytes(b"half a graph")
        raise export.onnx.exporter.ExportError("exporter failed")

    monkeypatch.setattr(export.onnx.exporter, "export_onnx", failing_export)
    out = tmp_path / "export"
    result = invoke("onnx", CHECKPOINT, "--out", out)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: exporter failed"]
    assert list(tmp_path.iterdir()) == []


def test_merge_of_our_checkpoint_directory(tmp_path):
    save_checkpoint(fixture_model(), tmp_path / "ckpt")
    result = invoke("merge", tmp_path / "ckpt", "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert read_state(tmp_path / "merged")["merged"] is True
