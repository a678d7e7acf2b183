"""Deployment bundles, and building from one in a virtual environment without torch and timm."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from export.artifacts.bundle import verify_bundle
from export.cli import main as export_cli
from export.errors import ExportError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "upstream-mtlora-tiny" / "checkpoint.pth"


def run(*args):
    result = CliRunner().invoke(export_cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    code, output = run("build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32", "--precision", "int8",
                       "--calib-samples", "16", "--eval-samples", "8", "--out", root / "build")
    assert code == 0, output
    code, output = run("bundle", root / "build", "--out", root / "bundle")
    assert code == 0, output
    return root / "bundle"


def test_bundle_is_self_contained_and_verified(bundle):
    index = verify_bundle(bundle)
    names = set(index["files"])
    assert {"export/model.onnx", "export/manifest.json", "export/reference.npz", "evalset.npz", "README.md",
            "graphs/model.fp16.onnx", "graphs/model.int8.qdq.onnx"} <= names
    readme = (bundle / "README.md").read_text()
    assert "--from-bundle" in readme and "--backend tensorrt --precision fp16" in readme
    with tarfile.open(bundle.with_name(bundle.name + ".tar.gz")) as tar:
        assert f"{bundle.name}/bundle.json" in tar.getnames()


def test_tampered_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(bundle, copy)
    with open(copy / "graphs" / "model.int8.qdq.onnx", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ExportError, match="model.int8.qdq.onnx was modified"):
        verify_bundle(copy)
    code, output = run("build", "--from-bundle", copy, "--backend", "onnxruntime", "--precision", "int8",
                       "--out", tmp_path / "out")
    assert code == 1 and "was modified" in output


def _venv_without_torch(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    # The torch-free extras only: what a Jetson or a CPU box installs.
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"{ROOT}[onnxruntime,openvino]"], check=True,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return path / "bin"


def test_build_check_run_from_bundle_without_torch(bundle, tmp_path):
    bin_dir = _venv_without_torch(tmp_path / "venv")
    probe = subprocess.run([str(bin_dir / "python"), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the deployment venv must not have torch"
    probe = subprocess.run([str(bin_dir / "python"), "-c", "import timm"], capture_output=True)
    assert probe.returncode != 0, "the deployment venv must not have timm"
    cli = str(bin_dir / "mtlora-export")
    out = tmp_path / "device-build"
    built = subprocess.run([cli, "build", "--from-bundle", str(bundle), "--backend", "onnxruntime", "--backend",
                            "openvino", "--precision", "fp32", "--precision", "int8", "--out", str(out)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and len(report["engines"]) == 4
    assert all(e["reference"] == "stored" for e in report["engines"])
    checked = subprocess.run([cli, "check", str(out), "--baseline", str(out / "report.json")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (120, 90), (200, 40, 40)).save(image)
    ran = subprocess.run([cli, "run", str(out / "engines" / "openvino-int8"), "--image", str(image),
                          "--out", str(tmp_path / "pred.npz")], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    import numpy as np

    with np.load(tmp_path / "pred.npz") as pred:
        assert pred["semseg"].shape == (1, 21, 64, 64) and pred["normals"].shape == (1, 3, 64, 64)
    assert (tmp_path / "pred_photo_semseg.png").is_file()
