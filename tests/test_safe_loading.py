"""Safe loading: no file a user hands us is unpickled, except official checkpoints through the allow-list.

Every loader gets a pickle that would run a command when unpickled (`__reduce__` -> os.system touching a
marker file). Nothing may run, and the error must be one clear line.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from export.cli import main as export_cli
from mtlora.cli import main as mtlora_cli
from tests.conftest import FIXTURE, invoke

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile(tmp_path):
    """Pickled payloads in every shape a loader might meet, and the marker they would create."""
    marker = tmp_path / "PWNED"
    payload = Payload(marker)
    files = tmp_path / "hostile"
    files.mkdir()
    raw = pickle.dumps(payload)
    (files / "raw.pth").write_bytes(raw)
    (files / "raw.npz").write_bytes(raw)
    (files / "raw.json").write_bytes(raw)
    # A real torch zip checkpoint whose data.pkl holds the payload, in the official layout.
    torch.save({"model": {"w": torch.zeros(2)}, "config": payload}, files / "zip.pth")
    # An .npz whose array is a pickled object, and an .npy of one under an .npz name.
    np.savez(files / "object.npz", input=np.array([payload], dtype=object))
    np.save(files / "object.npy", np.array([payload], dtype=object))
    (files / "object.npy").rename(files / "object_npy.npz")
    assert pickle.loads(raw) == 0 and marker.exists(), "the payload itself must work"
    marker.unlink()
    return files, marker


def assert_refused(code: int, output: str, marker: Path, *needles: str) -> None:
    assert code == 1, output
    assert not marker.exists(), "the pickled payload ran"
    lines = output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_no_loader_unpickles_outside_the_allow_list():
    """Static guard: pickle is only ever loaded by mtlora/safe_pickle.py."""
    forbidden = re.compile(r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                           r"yaml\.(unsafe_)?load\(|marshal\.loads?\(|joblib\.load|dill\.")
    offenders = []
    for package in ("mtlora", "export", "engines", "calibration"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "safe_pickle.py":
                continue
            offenders += [f"{path.relative_to(ROOT)}: {line.strip()}" for line in path.read_text().splitlines()
                          if forbidden.search(line)]
    assert not offenders, offenders


def test_upstream_import_refuses_pickled_code(hostile, tmp_path):
    files, marker = hostile
    code, output = invoke(mtlora_cli, "import-upstream", files / "zip.pth", "--out", tmp_path / "imported")
    assert_refused(code, output, marker, "refused to load", "posix.system")
    code, output = invoke(mtlora_cli, "import-upstream", files / "raw.pth", "--out", tmp_path / "imported")
    assert_refused(code, output, marker, "not a PyTorch checkpoint")
    assert not (tmp_path / "imported").exists()
    code, output = invoke(mtlora_cli, "info", files / "zip.pth")
    assert_refused(code, output, marker, "refused to load")
    code, output = invoke(export_cli, "onnx", files / "zip.pth", "--out", tmp_path / "export")
    assert_refused(code, output, marker, "refused to load")
    code, output = invoke(mtlora_cli, "predict", files / "zip.pth", "--input", files / "raw.npz",
                          "--out", tmp_path / "p.npz")
    assert_refused(code, output, marker, "refused to load")


def test_pretrained_backbone_loader_refuses_pickled_code(hostile):
    from mtlora.cli.options import model_config_from_options
    from mtlora.errors import CheckpointError
    from mtlora.model import MultiTaskSwin
    from mtlora.pretrained import load_pretrained_backbone

    files, marker = hostile
    model = MultiTaskSwin(model_config_from_options(preset="default"))
    for name, match in (("zip.pth", "refused to load"), ("raw.pth", "not a PyTorch checkpoint")):
        with pytest.raises(CheckpointError, match=match):
            load_pretrained_backbone(model, files / name)
    safetensors = files / "raw.safetensors"
    safetensors.write_bytes((files / "raw.pth").read_bytes())
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_pretrained_backbone(model, safetensors)
    assert not marker.exists()


def test_checkpoint_loader_refuses_pickled_files(hostile, tmp_path):
    from mtlora.checkpoint import save_checkpoint
    from mtlora.upstream import import_upstream

    files, marker = hostile
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(import_upstream(FIXTURE), checkpoint)
    raw = (files / "raw.pth").read_bytes()
    for name, needle in (("model.safetensors", "corrupt or truncated weights"), ("config.json", "cannot read config"),
                         ("state.json", "corrupt checkpoint state")):
        damaged = tmp_path / f"damaged-{name}"
        damaged.mkdir()
        for f in checkpoint.iterdir():
            (damaged / f.name).write_bytes(raw if f.name == name else f.read_bytes())
        code, output = invoke(mtlora_cli, "predict", damaged, "--input", files / "raw.npz", "--out", tmp_path / "p.npz")
        assert_refused(code, output, marker, needle)
    # `mtlora train --resume` reads the optimizer state as safetensors + JSON.
    run = tmp_path / "run" / "last"
    run.mkdir(parents=True)
    for f in checkpoint.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    (run / "training_state.json").write_bytes(raw)
    (run / "training_state.safetensors").write_bytes(raw)
    code, output = invoke(mtlora_cli, "train", "--resume", run, "--out", tmp_path / "resumed")
    assert_refused(code, output, marker)


@pytest.mark.parametrize("name", ["raw.npz", "object.npz", "object_npy.npz"])
def test_predict_input_npz_is_never_unpickled(hostile, tmp_path, name):
    files, marker = hostile
    code, output = invoke(mtlora_cli, "predict", FIXTURE, "--input", files / name, "--out", tmp_path / "p.npz")
    assert_refused(code, output, marker, str(files / name))
    assert not (tmp_path / "p.npz").exists()


def test_evalset_and_reference_readers_refuse_pickles(hostile, ort_build, copy_build, tmp_path):
    from export.artifacts.evalset import EvalSet
    from export.errors import ExportError

    files, marker = hostile
    for name in ("raw.npz", "object.npz", "object_npy.npz"):
        with pytest.raises(ExportError, match="not a readable evaluation set"):
            EvalSet.read(files / name)
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                          "--eval-data", files / "object.npz", "--out", tmp_path / "b")
    assert_refused(code, output, marker, "not a readable evaluation set")
    assert not (tmp_path / "b").exists()
    # reference.npz replaced by a pickle, with the manifest re-hashed so that only the reader stands in the way.
    build = copy_build(ort_build)
    reference = build / "export" / "reference.npz"
    reference.write_bytes((files / "object.npz").read_bytes())
    manifest = json.loads((build / "export" / "manifest.json").read_text())
    manifest["files"]["reference.npz"] = {"sha256": hashlib.sha256(reference.read_bytes()).hexdigest(),
                                          "size": reference.stat().st_size}
    (build / "export" / "manifest.json").write_text(json.dumps(manifest))
    code, output = invoke(export_cli, "check", build)
    assert_refused(code, output, marker, "reference.npz: not a readable reference file")


def test_calibration_cache_treats_pickles_as_a_miss(hostile, ort_build, copy_build):
    from calibration.cache import MANIFEST, CalibrationCache

    files, marker = hostile
    build = copy_build(ort_build)
    cache = CalibrationCache(build / "calibration-cache")
    (entry,) = [p for p in cache.root.iterdir() if p.is_dir()]
    assert cache.lookup(entry.name) is not None
    (entry / "model.qdq.onnx").write_bytes((files / "raw.pth").read_bytes())
    assert cache.lookup(entry.name) is None, "a replaced result must not verify"
    (entry / MANIFEST).write_bytes((files / "raw.pth").read_bytes())
    assert cache.lookup(entry.name) is None and cache.manifest(entry.name) is None
    assert not marker.exists()


def test_engine_sidecars_and_indexes_refuse_pickles(hostile, ort_build, ort_bundle, copy_build, tmp_path):
    files, marker = hostile
    raw = (files / "raw.pth").read_bytes()
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    build = copy_build(ort_build)
    engine = build / "engines" / "onnxruntime-fp32"
    (engine / "model.fp32.onnx.json").write_bytes(raw)
    code, output = invoke(export_cli, "run", engine, "--image", image, "--out", tmp_path / "pred.npz")
    assert_refused(code, output, marker, "model.fp32.onnx.json is not valid JSON")
    (engine / "engine.json").write_bytes(raw)
    code, output = invoke(export_cli, "run", engine, "--image", image, "--out", tmp_path / "pred.npz")
    assert_refused(code, output, marker, "engine.json: corrupt")
    assert not (tmp_path / "pred.npz").exists()
    # The engine file itself replaced by a pickle: its SHA-256 no longer matches the sidecar.
    build = copy_build(ort_build, "copy2")
    (build / "engines" / "onnxruntime-int8" / "model.int8.onnx").write_bytes(raw)
    code, output = invoke(export_cli, "check", build)
    assert_refused(code, output, marker, "model.int8.onnx was modified")
    # build.json, the baseline report, the tolerance file, the bundle index.
    baseline = files / "raw.json"
    code, output = invoke(export_cli, "check", ort_build, "--baseline", baseline)
    assert_refused(code, output, marker, "not a valid report")
    code, output = invoke(export_cli, "build", FIXTURE, "--tolerances", baseline, "--out", tmp_path / "b")
    assert_refused(code, output, marker, "tolerance file is not valid JSON")
    (build / "build.json").write_bytes(raw)
    code, output = invoke(export_cli, "check", build)
    assert_refused(code, output, marker, "build.json: corrupt")
    bundle = copy_build(ort_bundle, "bundle")
    (bundle / "bundle.json").write_bytes(raw)
    code, output = invoke(export_cli, "build", "--from-bundle", bundle, "--backend", "onnxruntime",
                          "--precision", "fp32", "--out", tmp_path / "device")
    assert_refused(code, output, marker, "bundle.json: corrupt")
    assert not (tmp_path / "device").exists() and not (tmp_path / "b").exists()


def test_json_side_files_refuse_pickles(hostile, tmp_path, monkeypatch):
    files, marker = hostile
    code, output = invoke(mtlora_cli, "evaluate", FIXTURE, "--data", "synthetic", "--samples", "2",
                          "--baseline-json", files / "raw.json")
    assert_refused(code, output, marker, "cannot read baselines")
    project = tmp_path / "project"
    project.mkdir()
    (project / "mtlora-export.json").write_bytes((files / "raw.json").read_bytes())
    monkeypatch.chdir(project)
    code, output = invoke(export_cli, "build", "--out", tmp_path / "b")
    assert_refused(code, output, marker, "mtlora-export.json: not valid JSON")
