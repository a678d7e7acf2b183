"""Deployment bundles, and the README's device steps pasted, in order, into a fresh virtual environment
that holds the bundle's wheel and its torch-free dependencies only: no torch, no timm, no checkout."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from export.artifacts.bundle import verify_bundle
from export.artifacts.device_install import device_commands, install_table
from export.cli import main as export_cli
from export.errors import ExportError

ROOT = Path(__file__).resolve().parents[1]
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
WHEEL = f"mtlora_export-{tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['version']}-py3-none-any.whl"


def run(*args):
    result = CliRunner().invoke(export_cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def bundle(ort_build, tmp_path_factory):
    """The shared fp32 + int8 ONNX Runtime build (tests/conftest.py), bundled under the name the README's
    device steps use, so they run here as written."""
    root = tmp_path_factory.mktemp("deploy")
    code, output = run("bundle", ort_build, "--out", root / "bundle-default")
    assert code == 0, output
    return root / "bundle-default"


def test_bundle_is_self_contained_and_verified(bundle):
    index = verify_bundle(bundle)
    names = set(index["files"])
    assert {"export/model.onnx", "export/manifest.json", "export/reference.npz", "evalset.npz", "README.md",
            "graphs/model.fp16.onnx", "graphs/model.int8.qdq.onnx", "tolerances.json", "constraints.txt",
            WHEEL} <= names
    assert index["wheel"] == WHEEL and index["gate"]["passed"] is True
    # The bundle's README shows the same steps and install table as the main README, for its own name.
    readme = (bundle / "README.md").read_text()
    assert device_commands(bundle.name, WHEEL) in readme and install_table(bundle.name, WHEEL) in readme
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


# The README's device steps are for a Jetson; on this CPU the ONNX Runtime row of the install table
# stands in for TensorRT. These, and nothing else, are changed in the pasted text.
ON_THIS_CPU = {"[tensorrt-cu12]": "[onnxruntime]", "--backend tensorrt": "--backend onnxruntime",
               "engines/tensorrt-fp16": "engines/onnxruntime-fp16"}
WHEELHOUSE = Path(os.environ.get("MTLORA_TEST_WHEELHOUSE")
                  or Path.home() / ".cache" / "mtlora-export" / "test-wheelhouse")


def readme_device_steps() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying on Jetson"):]
    start = section.index("```bash\n", section.index("On the device, with only")) + len("```bash\n")
    return section[start:section.index("```", start)]


def wheelhouse(bundle: Path) -> Path:
    """Wheels of what the bundle's wheel needs for ONNX Runtime, at its constraints' versions: fetched
    once through pip's configured index and kept, so the device install runs with --no-index (offline)."""
    wanted = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "--only-binary=:all:", "--dest", str(WHEELHOUSE), "-c", str(bundle / "constraints.txt"),
              f"{bundle / WHEEL}[onnxruntime]"]
    offline = subprocess.run([*wanted, "--no-index", "--find-links", str(WHEELHOUSE)], capture_output=True, text=True)
    if offline.returncode != 0:
        online = subprocess.run(wanted, capture_output=True, text=True, timeout=600)
        if online.returncode != 0:
            pytest.skip(f"the wheels the device install needs could not be fetched: {online.stderr.strip()[-300:]}")
    for ours in WHEELHOUSE.glob("mtlora_export-*.whl"):
        ours.unlink()  # the device installs the bundle's own wheel, never a kept copy
    return WHEELHOUSE


def device_env(device: Path, wheels: Path) -> dict[str, str]:
    """A shell on the device: HOME there, the system's python3 on PATH, pip offline on `wheels`, and
    nothing of this checkout or its virtual environment (no PYTHONPATH, no VIRTUAL_ENV)."""
    system_bin = device / ".system-bin"
    system_bin.mkdir()
    base = getattr(sys, "_base_executable", None) or str(Path(sys.base_prefix) / "bin" / "python3")
    (system_bin / "python3").symlink_to(base)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "CONDA"))}
    env.update(HOME=str(device), PATH=f"{system_bin}:/usr/bin:/bin", PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(wheels), PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    return env


def test_readme_device_steps_work_pasted_with_only_the_bundle(bundle, tmp_path):
    wheels = wheelhouse(bundle)
    device = tmp_path / "device"
    device.mkdir()
    shutil.copy(bundle.with_name(bundle.name + ".tar.gz"), device)  # the bundle directory is unpacked by the steps
    from PIL import Image

    Image.new("RGB", (120, 90), (200, 40, 40)).save(device / "photo.jpg")
    steps = readme_device_steps()
    for jetson, cpu in ON_THIS_CPU.items():
        assert steps.count(jetson) == 1, f"README device steps changed: {jetson!r}"
        steps = steps.replace(jetson, cpu)
    env = device_env(device, wheels)
    pasted = subprocess.run(["bash", "-euo", "pipefail", "-c", steps], capture_output=True, text=True, cwd=device,
                            env=env, timeout=600)
    assert pasted.returncode == 0, f"{steps}\n{pasted.stdout[-3000:]}\n{pasted.stderr[-3000:]}"
    report = json.loads((device / "build" / "report.json").read_text())
    assert report["passed"] and [e["engine"]["precision_requested"] for e in report["engines"]] == ["fp16"]
    assert all(e["reference"] == "stored" for e in report["engines"])
    with np.load(device / "prediction.npz") as pred:
        assert pred["semseg"].shape == (1, 21, 64, 64) and pred["normals"].shape == (1, 3, 64, 64)

    venv = device / "mtlora" / "bin"

    def on_device(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=device, env=env)

    # What ran is the installed wheel, without PyTorch or timm.
    for module in ("torch", "timm"):
        assert on_device(venv / "python", "-c", f"import {module}").returncode != 0, f"{module} is installed"
    where = on_device(venv / "python", "-c", "import export, engines; print(export.__file__, engines.__file__)")
    assert where.returncode == 0 and all(p.startswith(str(device / "mtlora")) for p in where.stdout.split())
    # fp32 and int8 (from the bundled Q/DQ graph: no calibration data on the device), then the CI gate.
    cli = venv / "mtlora-export"
    built = on_device(cli, "build", "--from-bundle", "bundle-default", "--backend", "onnxruntime",
                      "--precision", "fp32", "--precision", "int8", "--out", "build-cpu")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "tolerances: the bundle's" in built.stdout + built.stderr
    assert json.loads((device / "build-cpu" / "report.json").read_text())["passed"]
    checked = on_device(cli, "check", "build-cpu", "--baseline", "build-cpu/report.json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # An installed package cannot bundle itself: one line saying so and what to do.
    again = on_device(cli, "bundle", "build-cpu", "--out", "again")
    assert again.returncode == 1 and "not from a checkout" in again.stderr, again.stdout + again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and not (device / "again").exists()
