"""A bundle carries its build's accuracy verdict and tolerances: a failed build is refused unless
--allow-failed (then bundle.json and the README say so), and `build --from-bundle` is held to the
workstation's tolerances. Every refusal is one line, exit 1, and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.cli import main as export_cli
from tests.conftest import invoke

# Loose enough to pass, and not a default, so a device report shows whether it was used.
LOOSE = {"fp32": {"*": {"max_abs": 0.5}}}
# No engine agrees with PyTorch to the last bit: every fp32 check fails.
STRICT = {"fp32": {"*": {"max_abs": 0.0}}}


@pytest.fixture(scope="module")
def builds(ort_build, tmp_path_factory) -> dict[str, Path]:
    from tests.conftest import FIXTURE

    root = tmp_path_factory.mktemp("gate")
    made = {}
    for name, tolerances, expected in (("passed", LOOSE, 0), ("failed", STRICT, 1)):
        shutil.copytree(ort_build, root / name)
        limits = root / f"{name}-tolerances.json"
        limits.write_text(json.dumps(tolerances))
        code, output = invoke(export_cli, "build", FIXTURE, "--backend", "onnxruntime", "--precision", "fp32",
                              "--precision", "int8", "--calib-samples", "8", "--eval-samples", "4",
                              "--tolerances", limits, "--out", root / name)
        assert code == expected, output
        assert "[onnxruntime-fp32] reusing" in output  # only the checks ran again
        made[name] = root / name
    return made


def _refused(output: str, code: int, out: Path, *words: str) -> None:
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in output, output
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists() and not out.with_name(out.name + ".tar.gz").exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "a partial was left"


def test_a_failed_build_is_refused(builds, tmp_path):
    out = tmp_path / "bundle"
    code, output = invoke(export_cli, "bundle", builds["failed"], "--out", out)
    _refused(output, code, out, "FAILED its accuracy gate", "onnxruntime-fp32 (", "--allow-failed")


def test_allow_failed_records_the_failure_and_the_device_build_fails_too(builds, tmp_path):
    out = tmp_path / "bundle"
    code, output = invoke(export_cli, "bundle", builds["failed"], "--out", out, "--allow-failed")
    assert code == 0, output
    index = json.loads((out / "bundle.json").read_text())
    assert index["gate"]["passed"] is False and index["gate"]["bundled_with_allow_failed"] is True
    assert any(f.startswith("onnxruntime-fp32 (") for f in index["gate"]["failed"]), index["gate"]
    assert "Accuracy gate on the workstation: FAILED" in (out / "README.md").read_text()
    assert json.loads((out / "tolerances.json").read_text()) == STRICT
    # The device build is held to the same tolerances: with the defaults it would pass (the shared build did).
    code, output = invoke(export_cli, "build", "--from-bundle", out, "--backend", "onnxruntime",
                          "--precision", "fp32", "--out", tmp_path / "device")
    assert code == 1 and "FAILED" in output, output
    assert "tolerances: the bundle's" in output and "FAILED its accuracy gate on the workstation" in output


def test_the_device_build_uses_the_carried_tolerances(builds, tmp_path):
    out = tmp_path / "bundle"
    code, output = invoke(export_cli, "bundle", builds["passed"], "--out", out)
    assert code == 0, output
    index = json.loads((out / "bundle.json").read_text())
    assert index["gate"] == {"passed": True, "engines": ["onnxruntime-fp32", "onnxruntime-int8"], "failed": [],
                             "bundled_with_allow_failed": False}
    assert json.loads((out / "tolerances.json").read_text()) == LOOSE
    assert index["tolerances"]["source"].endswith("passed-tolerances.json")
    assert "PASSED" in (out / "README.md").read_text()
    device = tmp_path / "device"
    code, output = invoke(export_cli, "build", "--from-bundle", out, "--backend", "onnxruntime",
                          "--precision", "fp32", "--out", device)
    assert code == 0, output

    def max_abs_limits(build: Path) -> set[float]:
        report = json.loads((build / "report.json").read_text())
        return {c["limit"] for e in report["engines"] for t in e["tasks"].values() for c in t["checks"]
                if c["name"] == "max_abs"}

    assert max_abs_limits(device) == {0.5}  # the default is 1e-3
    # `check` on the device re-reads the same limits; an explicit --tolerances there wins.
    code, output = invoke(export_cli, "check", device)
    assert code == 0 and max_abs_limits(device) == {0.5}, output
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps(STRICT))
    code, output = invoke(export_cli, "build", "--from-bundle", out, "--backend", "onnxruntime",
                          "--precision", "fp32", "--tolerances", strict, "--out", device)
    assert code == 1 and max_abs_limits(device) == {0.0}, output


def _without_record(build: Path) -> None:
    (build / "build.json").unlink()


def _report_edited(build: Path) -> None:
    report = json.loads((build / "report.json").read_text())
    report["passed"] = True
    for engine in report["engines"]:
        engine["passed"] = True
    (build / "report.json").write_text(json.dumps(report))


def _limits_edited_to_pass(build: Path) -> None:
    """The checks rewritten to pass, and the record made to vouch for the edit: the verdict comes from
    each check's value and limit, so a forged limit is what it would take."""
    import hashlib

    report = json.loads((build / "report.json").read_text())
    for engine in report["engines"]:
        for task in engine["tasks"].values():
            for check in task["checks"]:
                check["passed"] = True
    (build / "report.json").write_text(json.dumps(report))
    record = json.loads((build / "build.json").read_text())
    record["passed"] = True
    record["files"]["report.json"] = hashlib.sha256((build / "report.json").read_bytes()).hexdigest()
    (build / "build.json").write_text(json.dumps(record))


def _tolerances_gone(build: Path) -> None:
    """A build made before build.json recorded its limits, whose --tolerances file has gone since."""
    record = json.loads((build / "build.json").read_text())
    del record["tolerances"]
    (build / "build.json").write_text(json.dumps(record))
    (build.parent / "failed-tolerances.json").rename(build.parent / "moved.json")


# Every way a failed or unverifiable build could slip into a bundle: (damage, words of the one line).
REFUSALS = {
    "no build record (interrupted)": (_without_record, ("build.json", "re-run")),
    "report edited to say passed": (_report_edited, ("report.json", "modified")),
    "passed flags forged, limits kept": (_limits_edited_to_pass, ("FAILED its accuracy gate",)),
    "older build, its tolerance file gone": (_tolerances_gone, ("failed-tolerances.json", "is gone")),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_no_failed_or_unverifiable_build_is_bundled(case, builds, tmp_path):
    damage, words = REFUSALS[case]
    build = tmp_path / "failed"
    shutil.copytree(builds["failed"], build)
    shutil.copy(builds["failed"].parent / "failed-tolerances.json", tmp_path)
    record = json.loads((build / "build.json").read_text())
    record["options"]["tolerances"] = str(tmp_path / "failed-tolerances.json")
    (build / "build.json").write_text(json.dumps(record))
    damage(build)
    out = tmp_path / "bundle"
    for extra in ((), ("--allow-failed",)) if case != "passed flags forged, limits kept" else ((),):
        code, output = invoke(export_cli, "bundle", build, "--out", out, *extra)
        _refused(output, code, out, *words)


def test_the_bundle_carries_the_limits_that_decided_the_verdict(builds, tmp_path):
    """Not the tolerance file as it is now: the build's limits, or those of the latest `check`."""
    build = tmp_path / "passed"
    shutil.copytree(builds["passed"], build)
    limits = Path(json.loads((build / "build.json").read_text())["options"]["tolerances"])
    edited = tmp_path / "edited-later.json"
    edited.write_text(json.dumps(STRICT))
    record = json.loads((build / "build.json").read_text())
    record["options"]["tolerances"] = str(edited)  # the build's file, edited after the build
    (build / "build.json").write_text(json.dumps(record))
    code, output = invoke(export_cli, "bundle", build, "--out", tmp_path / "bundle")
    assert code == 0, output
    assert json.loads((tmp_path / "bundle" / "tolerances.json").read_text()) == LOOSE
    # `check` with other limits makes a new verdict, and the bundle follows it.
    assert json.loads(limits.read_text()) == LOOSE
    code, output = invoke(export_cli, "check", build, "--tolerances", edited)
    assert code == 1, output
    out = tmp_path / "bundle-after-check"
    code, output = invoke(export_cli, "bundle", build, "--out", out)
    _refused(output, code, out, "FAILED its accuracy gate")
    code, output = invoke(export_cli, "bundle", build, "--out", out, "--allow-failed")
    assert code == 0 and json.loads((out / "tolerances.json").read_text()) == STRICT, output
