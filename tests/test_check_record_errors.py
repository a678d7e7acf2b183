"""`check` refuses a damaged build record, a damaged baseline and a folder that is not a build with one
line, exit 1, before any work and with nothing written: not a file of the build, not even its lock."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from export.cli import main as export_cli
from tests.conftest import invoke

NON_FINITE = {"nan": math.nan, "inf": math.inf, "neg_inf": -math.inf}
# Values no count may hold: non-finite, text, a float, bool (an int to Python), below the range.
NOT_COUNTS = {**NON_FINITE, "text": "4", "float": 4.0, "true": True, "list": [4], "object": {"n": 4}}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `root` with its size and mtime: what a refusal must leave as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _refused(code: int, output: str, *expected: str) -> None:
    assert code == 1, output
    assert "Traceback" not in output and "internal error" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    for text in expected:
        assert text in lines[0], output


# ------------------------------------------------------------------------------- build.json's options

RECORD_CASES = {
    **{f"eval_samples_{k}": ("eval_samples", v) for k, v in NOT_COUNTS.items()},
    **{f"batch_size_{k}": ("batch_size", v) for k, v in NOT_COUNTS.items()},
    **{f"report_samples_{k}": ("report_samples", v) for k, v in NOT_COUNTS.items()},
    **{f"img_size_{k}": ("img_size", v) for k, v in NOT_COUNTS.items()},
    **{f"threads_{k}": ("threads", v) for k, v in NOT_COUNTS.items()},
    "eval_samples_zero": ("eval_samples", 0), "eval_samples_negative": ("eval_samples", -3),
    "eval_samples_null": ("eval_samples", None), "batch_size_zero": ("batch_size", 0),
    "report_samples_negative": ("report_samples", -1), "report_samples_null": ("report_samples", None),
    "img_size_zero": ("img_size", 0), "threads_zero": ("threads", 0),
    **{f"{name}_{k}": (name, v) for name in ("checkpoint", "eval_data", "tolerances", "from_bundle")
       for k, v in {"number": 5, "nan": math.nan, "true": True, "list": ["a"]}.items()},
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_a_damaged_option_in_the_build_record_is_one_line_before_any_work(case, ort_build, copy_build):
    name, value = RECORD_CASES[case]
    build = copy_build(ort_build)
    record = json.loads((build / "build.json").read_text())
    record["options"][name] = value
    (build / "build.json").write_text(json.dumps(record))  # json writes NaN / Infinity as such
    before = _snapshot(build)
    code, output = invoke(export_cli, "check", build)
    _refused(code, output, f"{build / 'build.json'}: options.{name} is ", "re-run 'mtlora-export build'")
    assert _snapshot(build) == before


# ------------------------------------------------------------------------------- the baseline's fields


def _task(r):
    return next(iter(r["engines"][0]["tasks"].values()))


def _labelled_task(r):
    return next(t for e in r["engines"] for t in e["tasks"].values() if t.get("metrics"))


BASELINE_CASES = {
    # The engine entry's counts, flags and text.
    **{f"samples_{k}": (lambda r, v=v: r["engines"][0].update(samples=v), "engines[0].samples")
       for k, v in {**NOT_COUNTS, "negative": -3}.items()},
    **{f"labelled_{k}": (lambda r, v=v: r["engines"][0].update(labelled=v), "engines[0].labelled")
       for k, v in {"text": "yes", "int": 1, "null": None}.items()},
    **{f"engine_passed_{k}": (lambda r, v=v: r["engines"][0].update(passed=v), "engines[0].passed")
       for k, v in {"text": "yes", "int": 1, "nan": math.nan}.items()},
    **{f"report_passed_{k}": (lambda r, v=v: r.update(passed=v), "passed")
       for k, v in {"text": "yes", "int": 0}.items()},
    "reference_number": (lambda r: r["engines"][0].update(reference=1), "engines[0].reference"),
    "backend_number": (lambda r: r["engines"][0]["engine"].update(backend=5), "engines[0].engine.backend"),
    "notes_number": (lambda r: r["engines"][0]["engine"].update(notes=[1]), "engines[0].engine.notes[0]"),
    "engine_not_object": (lambda r: r["engines"].__setitem__(0, 5), "engines[0] is 5"),
    "tasks_not_object": (lambda r: r["engines"][0].update(tasks=[]), "engines[0].tasks"),
    # A task's numbers: text and bool are not numbers; a count is a non-negative int.
    **{f"cosine_{k}": (lambda r, v=v: _task(r)["tensor"].update(cosine=v), ".tensor.cosine")
       for k, v in {"text": "0.9", "true": True, "null": None}.items()},
    **{f"non_finite_{k}": (lambda r, v=v: _task(r)["tensor"].update(non_finite=v), ".tensor.non_finite")
       for k, v in {**NOT_COUNTS, "negative": -1}.items()},
    "agreement_text": (lambda r: _task(r).update(argmax_agreement="1"), ".argmax_agreement"),
    "angle_true": (lambda r: _task(r).update(angle_deg=True), ".angle_deg"),
    "check_value_text": (lambda r: _task(r)["checks"][0].update(value="1"), ".checks[0].value"),
    "check_limit_true": (lambda r: _task(r)["checks"][0].update(limit=True), ".checks[0].limit"),
    "check_op": (lambda r: _task(r)["checks"][0].update(op="<"), ".checks[0].op"),
    "check_passed_text": (lambda r: _task(r)["checks"][0].update(passed="yes"), ".checks[0].passed"),
    # The metrics: the stored drop is recomputed, so only one that finite metrics cannot give is refused.
    **{f"drop_{k}": (lambda r, v=v: _labelled_task(r)["metrics"].update(drop=v), ".metrics.drop")
       for k, v in {**NON_FINITE, "text": "1", "true": True}.items()},
    "metric_text": (lambda r: _labelled_task(r)["metrics"]["engine"].update(
        {_labelled_task(r)["metrics"]["primary"]: "50"}), ".metrics.engine."),
    "higher_is_better_text": (lambda r: _labelled_task(r)["metrics"].update(higher_is_better="yes"),
                              ".metrics.higher_is_better"),
    # What identifies the evaluation data.
    "identity_samples_negative": (lambda r: r["identity"]["evaluation_data"].update(samples=-3),
                                  "identity.evaluation_data.samples"),
    "identity_samples_text": (lambda r: r["identity"]["evaluation_data"].update(samples="4"),
                              "identity.evaluation_data.samples"),
}


@pytest.mark.parametrize("case", sorted(BASELINE_CASES))
def test_a_damaged_field_of_the_baseline_is_one_line_before_any_work(case, ort_build, copy_build, tmp_path):
    edit, field = BASELINE_CASES[case]
    build = copy_build(ort_build)
    report = json.loads((ort_build / "report.json").read_text())
    edit(report)
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(report))
    before = _snapshot(build)
    code, output = invoke(export_cli, "check", build, "--baseline", baseline)
    _refused(code, output, f"{baseline}: the report's field ", field, "regenerate it")
    assert _snapshot(build) == before


def test_the_build_s_own_report_still_reads_as_a_baseline(ort_build):
    from export.checking.report import read_report

    assert read_report(ort_build / "report.json").to_dict()["engines"]


# ------------------------------------------------------------------------------- not a build

NOT_BUILDS = {
    "empty": lambda d: None,
    "notes": lambda d: (d / "notes.txt").write_text("mine\n"),
    "reports_only": lambda d: (d / "report.json").write_text("{}"),
    "corrupt_record": lambda d: (d / "build.json").write_text("{not json"),
    "record_not_a_build": lambda d: (d / "build.json").write_text('{"options": 5}'),
    "record_bad_option": lambda d: (d / "build.json").write_text('{"options": {"eval_samples": NaN}}'),
}


@pytest.mark.parametrize("case", sorted(NOT_BUILDS))
def test_checking_what_is_not_a_build_writes_nothing_into_it(case, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    NOT_BUILDS[case](folder)
    before = _snapshot(folder)
    code, output = invoke(export_cli, "check", folder)
    _refused(code, output, str(folder))
    assert _snapshot(folder) == before and not (folder / ".lock").exists()
