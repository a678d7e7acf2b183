"""Verified artifacts: every file is written atomically and listed with its SHA-256; `check`, `run`, `bench`
and `build --from-bundle` verify the hashes first and refuse a modified or truncated file by name."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from export.cli import main as export_cli
from tests.conftest import invoke


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_refused(code: int, output: str, *needles: str) -> None:
    assert code == 1, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "Traceback" not in output, output
    for needle in needles:
        assert needle in last, last


def test_every_artifact_is_listed_with_its_sha256(ort_build, ort_bundle):
    from engines.files import sha256_file

    manifest = json.loads((ort_build / "export" / "manifest.json").read_text())
    export_files = {p.name for p in (ort_build / "export").iterdir() if not p.name.startswith(".")} - {"manifest.json"}
    assert set(manifest["files"]) == export_files == {"model.onnx", "reference.npz"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(ort_build / "export" / name)
    for engine in (ort_build / "engines").iterdir():
        covered = {"engine.json", ".step.json"}
        for sidecar in engine.glob("*.json"):
            if sidecar.name in covered:
                continue
            data = json.loads(sidecar.read_text())
            assert all(sha256_file(engine / f) == digest for f, digest in data["files"].items())
            covered |= {sidecar.name, *data["files"]}
        assert {p.name for p in engine.iterdir()} <= covered, engine
    record = json.loads((ort_build / "build.json").read_text())
    assert record["files"]["evalset.npz"] == sha256_file(ort_build / "evalset.npz")
    index = json.loads((ort_bundle / "bundle.json").read_text())
    bundled = {p.relative_to(ort_bundle).as_posix() for p in ort_bundle.rglob("*") if p.is_file()} - {"bundle.json"}
    assert set(index["files"]) == bundled
    # Nothing half-written beside the results: no temp or staging files left behind.
    # (.lock is the build directory's lock file, kept between builds; it holds no result.)
    leftovers = [p for root in (ort_build, ort_bundle) for p in root.rglob(".*") if p.name not in (".step.json", ".lock")]
    assert not leftovers, leftovers


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    from engines.errors import EngineError
    from engines.files import write_atomic
    from export.artifacts.files import write_bytes_atomic
    from mtlora.errors import MTLoRAError
    from mtlora.fileio import write_json_atomic

    for write in (write_atomic, write_bytes_atomic, lambda p, d: write_json_atomic(p, json.loads(d))):
        target = tmp_path / "artifact"
        target.write_bytes(b"old")

        def fail(*_args):
            raise OSError(errno.ENOSPC, "disk full")

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", fail)
            # One line that says what happened and what to do, not the OSError's traceback.
            with pytest.raises((EngineError, MTLoRAError), match=r"artifact: could not be written \(disk full\); free"):
                write(target, b'"new"')
        assert target.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["artifact"], "the temp file must be removed"
        write(target, b'"new"')
        assert json.loads(target.read_text()) == "new"


@pytest.mark.parametrize("damage", [truncate, flip_byte], ids=["truncated", "modified"])
def test_check_refuses_damaged_files(ort_build, copy_build, damage):
    build = copy_build(ort_build)
    damage(build / "export" / "model.onnx")
    code, output = invoke(export_cli, "check", build)
    word = "truncated" if damage is truncate else "modified"
    assert_refused(code, output, f"model.onnx {'is' if word == 'truncated' else 'was'} {word}")
    build = copy_build(ort_build, "engine")
    damage(build / "engines" / "onnxruntime-int8" / "model.int8.onnx")
    code, output = invoke(export_cli, "check", build)
    assert_refused(code, output, "onnxruntime-int8: model.int8.onnx was modified")
    build = copy_build(ort_build, "evalset")
    damage(build / "evalset.npz")
    code, output = invoke(export_cli, "check", build)
    assert_refused(code, output, "evalset.npz was modified")


def test_run_refuses_a_damaged_engine(ort_build, copy_build, tmp_path):
    from PIL import Image

    build = copy_build(ort_build)
    engine = build / "engines" / "onnxruntime-fp32"
    image = tmp_path / "image.png"
    Image.new("RGB", (50, 40), (120, 30, 200)).save(image)
    code, output = invoke(export_cli, "run", engine, "--image", image, "--out", tmp_path / "ok.npz")
    assert code == 0, output
    truncate(engine / "model.fp32.onnx")
    code, output = invoke(export_cli, "run", engine, "--image", image, "--out", tmp_path / "bad.npz")
    assert_refused(code, output, "model.fp32.onnx was modified")
    assert not (tmp_path / "bad.npz").exists()


def test_bench_refuses_a_damaged_build(ort_build, copy_build, tmp_path):
    build = copy_build(ort_build)
    flip_byte(build / "engines" / "onnxruntime-fp32" / "model.fp32.onnx")
    code, output = invoke(export_cli, "bench", build, "--no-torch", "--json", tmp_path / "bench.json")
    assert_refused(code, output, "model.fp32.onnx was modified")
    assert not (tmp_path / "bench.json").exists()
    build = copy_build(ort_build, "export")
    truncate(build / "export" / "model.onnx")
    code, output = invoke(export_cli, "bench", build, "--no-torch")
    assert_refused(code, output, "model.onnx is truncated")


@pytest.mark.parametrize("damage", [truncate, flip_byte], ids=["truncated", "modified"])
def test_build_from_bundle_refuses_damaged_files(ort_bundle, copy_build, tmp_path, damage):
    bundle = copy_build(ort_bundle, "bundle")
    damage(bundle / "graphs" / "model.int8.qdq.onnx")
    code, output = invoke(export_cli, "build", "--from-bundle", bundle, "--backend", "onnxruntime",
                          "--precision", "int8", "--out", tmp_path / "device")
    assert_refused(code, output, "graphs/model.int8.qdq.onnx was modified")
    assert not (tmp_path / "device").exists()
