"""Interrupted work: a build SIGKILLed in the middle of a step leaves no partial artifact under a final name,
and the next build finishes, reusing only the steps that had completed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from calibration.cache import MANIFEST, CalibrationCache
from export.artifacts.engineset import EngineSet
from export.artifacts.manifest import verify_manifest
from tests.conftest import FIXTURE, engine_threads

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("mtlora-export")
ENGINE = "onnxruntime-int8"


def build_command(out: Path) -> list[str]:
    return [str(CLI), "build", str(FIXTURE), "--backend", "onnxruntime", "--precision", "int8",
            "--calib-samples", "8", "--eval-samples", "2", *engine_threads(), "--out", str(out)]


def build_until(out: Path, line_start: str) -> str:
    """Run a build and SIGKILL it as soon as it prints a progress line starting with `line_start`."""
    process = subprocess.Popen(build_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(line_start):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


def assert_nothing_partial(out: Path) -> None:
    """Under its final name a step's result is complete and verifies, or it is absent."""
    export = out / "export"
    if (export / "manifest.json").exists():
        verify_manifest(export)
    else:
        assert not export.exists() or not any(export.iterdir()), sorted(export.iterdir())
    engine = out / "engines" / ENGINE
    if engine.exists():
        EngineSet.read(engine).artifacts(verify=True)
    for entry in (out / "calibration-cache").glob("*"):
        if entry.is_dir() and (entry / MANIFEST).exists():
            assert CalibrationCache(entry.parent).lookup(entry.name) is not None, f"{entry} does not verify"
    for name in ("report.json", "build.json", "evalset.npz"):
        assert not (out / name).exists(), f"{name} before the build got that far"


def complete_cache_entries(out: Path) -> int:
    cache = CalibrationCache(out / "calibration-cache")
    return sum(1 for e in cache.root.glob("*") if e.is_dir() and cache.lookup(e.name) is not None)


def test_a_killed_build_leaves_nothing_partial_and_resumes(tmp_path, no_step_store):
    out = tmp_path / "build"

    # 1. Killed while exporting: no export under its final name.
    build_until(out, "[export] exporting model.onnx")
    assert_nothing_partial(out)
    assert not (out / "export" / "manifest.json").exists()

    # 2. Killed while calibrating: the export is complete, no calibration result, no engine.
    log = build_until(out, f"[{ENGINE}] preparing model.onnx (calibrating)")
    assert "[export] reusing" not in log, "the killed export must not be reused"
    assert_nothing_partial(out)
    verify_manifest(out / "export")
    assert complete_cache_entries(out) == 0 and not (out / "engines" / ENGINE).exists()

    # 3. Killed while building the engine: export and calibration are complete, the engine is not.
    log = build_until(out, f"[{ENGINE}] building engine")
    assert "[export] reusing" in log
    assert_nothing_partial(out)
    assert complete_cache_entries(out) == 1 and not (out / "engines" / ENGINE).exists()

    # 4. The next build finishes, reusing the export and the calibration, and building the engine.
    finished = subprocess.run(build_command(out), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "[export] reusing" in finished.stderr and f"[{ENGINE}] reusing" not in finished.stderr
    record = json.loads((out / "build.json").read_text())
    assert record["reused"] == ["export"] and record["passed"]
    sidecar = json.loads((out / "engines" / ENGINE / "model.int8.onnx.json").read_text())
    assert sidecar["metadata"]["calibration_cache"] == "hit"
    EngineSet.read(out / "engines" / ENGINE).artifacts(verify=True)
    assert not list(out.glob(".*.partial")) and not list((out / "engines").glob(".*")), "staging left behind"
