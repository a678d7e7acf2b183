"""Reliability, round two: a full disk, a neighbouring build, an interrupted set of records, failed
steps, file modes, links in bundles and odd file names. Each ends in one line and leaves nothing partial."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from export.artifacts.builddir import BuildDir
from export.cli import main as export_cli
from tests.conftest import FIXTURE, invoke


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` at `path`, or None where this machine cannot mount one (not root, no tmpfs)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def leftovers(root: Path) -> list[Path]:
    """Half-written files or staging folders under `root` (the build lock is not one)."""
    return [p for p in root.rglob("*") if p.name.endswith((".partial", ".tmp", ".pending")) or
            (p.name.startswith(".") and p.name not in (".step.json", ".lock"))]


@pytest.mark.parametrize("size", ["3m", "12m"])
def test_a_full_disk_is_one_line_and_leaves_nothing_partial(tmp_path, size, monkeypatch, no_step_store):
    with small_filesystem(tmp_path / "disk", size) as disk:
        if disk is not None:
            code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                                  "--eval-samples", "2", "--out", disk / "build")
            how = f"a real {size} tmpfs"
        else:
            # No tmpfs here: the same failure, raised where the writer would meet it.
            import mtlora_base.files

            real_fdopen = os.fdopen

            def full(fd, *args, **kwargs):
                handle = real_fdopen(fd, *args, **kwargs)
                handle.write = lambda _data: (_ for _ in ()).throw(OSError(28, "No space left on device"))
                return handle

            monkeypatch.setattr(mtlora_base.files.os, "fdopen", full)
            disk = tmp_path / "disk"
            code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                                  "--eval-samples", "2", "--out", disk / "build")
            how = "ENOSPC simulated at the atomic writer (no tmpfs here)"
        print(f"full disk: {how}")
        assert code == 1, output
        lines = [line for line in output.splitlines() if line.startswith("Error")]
        assert len(lines) == 1 and "No space left on device" in lines[0] and "free some space" in lines[0], output
        assert "Traceback" not in output
        assert not leftovers(disk), leftovers(disk)


def test_a_second_build_into_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "build"
    out.mkdir()
    with BuildDir(out).locked("build"):  # what a running build holds
        code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                              "--eval-samples", "2", "--out", out)
    assert code == 1 and "another build is writing here (build, pid" in output, output
    assert "cannot write here" not in output


def test_interrupted_records_are_finished_or_dropped(ort_build, copy_build):
    build = copy_build(ort_build)
    record = json.loads((build / "build.json").read_text())
    # Interrupted after build.json vouched for the new set, before the reports were renamed into place.
    report = build / "report.json"
    pending = build / ".report.json.pending"
    report.rename(pending)
    code, output = invoke(export_cli, "check", build)
    assert code == 0, output
    assert "finished publishing the records of an interrupted run: report.json" in output
    assert not pending.exists() and report.is_file()
    # Interrupted before build.json: the pending report is dropped and the previous set stands.
    pending.write_text('{"format": "mtlora-export/report/1", "passed": true}')
    code, output = invoke(export_cli, "check", build)
    assert code == 0 and "dropped the unfinished records" in output, output
    # A report without build.json (an older tool's interrupted run) says what happened and what to do.
    (build / "build.json").unlink()
    code, output = invoke(export_cli, "check", build)
    assert code == 1 and "interrupted before it finished; re-run 'mtlora-export build'" in output, output
    assert record["files"]["report.json"]


def test_a_modified_report_is_refused(ort_build, copy_build):
    build = copy_build(ort_build)
    data = json.loads((build / "report.json").read_text())
    data["passed"] = not data["passed"]
    (build / "report.json").write_text(json.dumps(data))
    code, output = invoke(export_cli, "check", build)
    assert code == 1 and "report.json was modified" in output, output


def test_a_failed_engine_step_leaves_no_staging_folder(tmp_path, monkeypatch, no_step_store):
    import engines.onnxruntime as ort_backend
    from engines.errors import EngineError

    def broken(*_args, **_kwargs):
        raise EngineError("the engine could not be built (simulated)")

    monkeypatch.setattr(ort_backend, "build", broken)
    out = tmp_path / "build"
    code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                          "--eval-samples", "2", "--out", out)
    assert code == 1 and "simulated" in output, output
    assert not leftovers(out), leftovers(out)
    assert not (out / "engines").exists() or not any((out / "engines").iterdir())


def test_checkpoints_and_artifacts_are_published_with_the_usual_modes(tmp_path):
    from mtlora.checkpoint import save_checkpoint
    from mtlora.upstream import import_upstream

    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    checkpoint = save_checkpoint(import_upstream(FIXTURE), tmp_path / "ckpt")
    for name in ("model.safetensors", "config.json", "state.json"):
        assert stat.S_IMODE((checkpoint / name).stat().st_mode) == expected, name


def test_a_bundle_with_a_symbolic_link_is_refused(ort_bundle, copy_build, tmp_path):
    bundle = copy_build(ort_bundle, "bundle")
    target = bundle / "evalset.npz"
    outside = tmp_path / "evalset-elsewhere.npz"
    shutil.move(target, outside)
    target.symlink_to(outside)  # the same bytes, through a link
    code, output = invoke(export_cli, "build", "--from-bundle", bundle, "--backend", "onnxruntime",
                          "--precision", "fp32", "--out", tmp_path / "device")
    assert code == 1 and "symbolic link(s) evalset.npz" in output, output
    assert not (tmp_path / "device").exists()


def test_run_names_outputs_without_control_characters(ort_build, tmp_path):
    odd = tmp_path / "odd\nname.png"
    Image.new("RGB", (64, 64), (0, 90, 0)).save(odd, format="PNG")
    out = tmp_path / "pred" / "out.npz"
    code, output = invoke(export_cli, "run", ort_build / "engines" / "onnxruntime-fp32", "--image", odd,
                          "--out", out)
    assert code == 0, output
    names = sorted(p.name for p in out.parent.glob("*.png"))
    assert names and all("\n" not in n for n in names) and "out_odd_name_semseg.png" in names, names
