"""The precision table, the precision plan parsed from `--precision`, and the gate's rule for whose limits
judge an engine: default limits follow the precision that ran, limits a user wrote are never loosened."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import numpy as np
import pytest

from engines.precision import (
    PARTS,
    PRECISIONS,
    PrecisionError,
    PrecisionPlan,
    built_by,
    by_looseness,
    get_precision,
    judged_precision,
)
from engines.registry import BACKENDS
from export.checking.accuracy import EvalBatch, check_engine
from export.checking.report import format_markdown, format_table, read_report, report_files
from export.checking.results import EngineInfo, Report
from export.checking.tolerances import LEVELS, Tolerances, default_tolerance
from export.errors import ExportError, ExportOptionError
from export.pipeline.check import PartTolerances, task_paths
from export.pipeline.options import ALL_PRECISIONS, plan_of, role_precisions
from mtlora.tasks import KINDS, TASKS
from tests.conftest import invoke

# ----------------------------------------------------------------------------- the table


def test_every_precision_row_agrees_with_the_backend_table():
    for name, row in PRECISIONS.items():
        assert row.name == name and str(row) == name
        assert row.family in ("float", "int") and row.bits in (8, 16, 32)
        assert row.backends and set(row.backends) <= set(BACKENDS), name
        assert row.runs_as[0] == name and set(row.runs_as) <= set(PRECISIONS), name
        assert set(row.levels) == set(PRECISIONS["fp32"].levels), name
        for kind in KINDS:  # every kind of task has limits at every precision
            default_tolerance(name, kind)
    for backend, spec in BACKENDS.items():
        assert spec.precisions == built_by(backend)
        assert all(backend in PRECISIONS[p].backends for p in spec.precisions)
    assert len({p.looseness for p in PRECISIONS.values()}) == len(PRECISIONS)
    assert by_looseness() == ("fp32", "fp16", "bf16", "int8")
    assert LEVELS == {name: row.levels for name, row in PRECISIONS.items()}
    assert ALL_PRECISIONS == ("fp32", "fp16", "int8")  # bf16 only when asked for by name
    assert [p.name for p in PRECISIONS.values() if p.calibrated] == ["int8"]
    assert [p.name for p in PRECISIONS.values() if p.sixteen_bit] == ["fp16", "bf16"]
    assert [p.name for p in PRECISIONS.values() if p.source] == ["fp32"]


def test_the_tolerance_file_and_the_command_line_take_the_tables_precisions():
    from export.cli.options import BuildPrecision

    Tolerances({name: {"*": {"min_cosine": 0.5}} for name in PRECISIONS})
    with pytest.raises(ExportError, match="unknown precision 'fp8'; use fp32, fp16, bf16, int8"):
        Tolerances({"fp8": {}})
    assert BuildPrecision.choices == [*PRECISIONS, "all", "auto"]


def test_what_ran_decides_the_limits_never_tighter_than_asked():
    assert judged_precision("fp16", "bf16").name == "bf16"  # OpenVINO's 16-bit speed on an AMX CPU
    assert judged_precision("fp16", "fp32").name == "fp16"  # fp16 weights, fp32 kernels between casts
    assert judged_precision("int8", "fp16").name == "int8"  # no int8 layer chosen: still quantized
    assert judged_precision("bf16", "fp32").name == "bf16"
    assert judged_precision("fp32", "mixed").name == "fp32"  # not a precision: no reason to loosen
    assert judged_precision("fp32", "bf16").name == "fp32"  # fp32 may not run as bf16: judged as asked
    assert judged_precision("fp16", "").name == "fp16"  # unknown
    assert get_precision("fp16").may_run_as("bf16") and not get_precision("fp32").may_run_as("bf16")


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("text, canonical", [
    ("fp16", "fp16"),
    ("heads=fp16,backbone=int8", "backbone=int8,heads=fp16"),
    (" backbone = int8 , heads = fp16 ", "backbone=int8,heads=fp16"),
    ("backbone=fp16,heads=fp16", "fp16"),  # every part the same: that precision
    ("sal=fp16,backbone=int8,heads=fp32,semseg=bf16", "backbone=int8,heads=fp32,sal=fp16,semseg=bf16"),
    ("backbone=int8,semseg=fp16", "backbone=int8,semseg=fp16"),
])
def test_plans_parse_to_one_canonical_name(text, canonical):
    plan = plan_of(text)
    assert str(plan) == canonical and plan_of(canonical) == plan
    assert plan.per_part == ("=" in canonical)


@pytest.mark.parametrize("text, message", [
    ("heads=fp16", "precision 'heads=fp16': give the backbone's precision too (backbone=...)"),
    ("backbone=int9,heads=fp16", "precision 'backbone=int9,heads=fp16': unknown precision 'int9' for backbone; "
                                 "choose one of fp32, fp16, bf16, int8"),
    ("backbone=int8,neck=fp16", "precision 'backbone=int8,neck=fp16': unknown part 'neck'; parts are backbone, "
                                f"heads or a task name ({', '.join(TASKS)})"),
    ("backbone=int8,backbone=fp16", "precision 'backbone=int8,backbone=fp16': backbone is given twice"),
    ("backbone=int8,heads", "write parts as backbone=PRECISION,heads=PRECISION (a task name sets that task's head alone)"),
    ("backbone=,heads=fp16", "write parts as backbone=PRECISION,heads=PRECISION"),
    ("int9", "unknown precision 'int9'; choose one of fp32, fp16, bf16, int8"),
])
def test_the_parser_rejects_what_it_rejected_before(text, message):
    with pytest.raises(ExportError) as refused:
        plan_of(text)
    assert message in str(refused.value)
    with pytest.raises(PrecisionError):  # the engines layer's own error, for callers without export
        PrecisionPlan.parse(text, tasks=TASKS)


def test_a_plan_answers_by_role_and_task():
    plan = plan_of("backbone=int8,heads=fp16,sal=fp32")
    assert plan.for_roles(["backbone", "head_semseg", "head_sal"]) == {
        "backbone": PRECISIONS["int8"], "head_semseg": PRECISIONS["fp16"], "head_sal": PRECISIONS["fp32"]}
    assert plan.for_task("sal").name == "int8"  # the loosest on its path
    assert [p.name for p in plan.used] == ["fp32", "fp16", "int8"] and plan.loosest.name == "int8"
    assert plan.uses("calibrated") and not plan_of("backbone=fp32,heads=fp16").uses("calibrated")
    assert plan.tasks_named() == ("sal",) and PARTS == ("backbone", "heads")
    assert plan_of("fp16").for_roles(["model"]) == {"model": PRECISIONS["fp16"]}
    with pytest.raises(ExportOptionError, match="it needs the split layout"):
        role_precisions("backbone=int8,heads=fp16", ["model"])
    with pytest.raises(ExportOptionError, match="leaves the head.s. of semseg, sal without a precision"):
        role_precisions("backbone=int8,depth=fp16", ["backbone", "head_semseg", "head_sal"])


def test_split_paths_judge_each_task_by_what_ran_on_its_path():
    plan = plan_of("backbone=fp32,heads=fp16")
    paths = task_paths(plan, {"backbone": "fp32", "head_semseg": "bf16", "head_sal": "fp32"}, ["semseg", "sal"])
    assert (paths["semseg"].asked.name, paths["semseg"].ran, paths["semseg"].judged.name) == ("fp16", "fp32/bf16", "bf16")
    assert (paths["sal"].asked.name, paths["sal"].ran, paths["sal"].judged.name) == ("fp16", "fp32", "fp16")
    _, judged = PartTolerances(Tolerances(), paths).judge("backbone=fp32,heads=fp16", "bf16/fp32", "semseg")
    assert judged.describe() == "fp16 asked, fp32/bf16 ran, bf16 defaults"


# ----------------------------------------------------------------------------- whose limits judge


def test_precedence_ran_entry_then_asked_entry_then_defaults_of_what_ran():
    fp16_tight = {"fp16": {"normals": {"max_angle_deg": 0.3}}}
    bf16_own = {**fp16_tight, "bf16": {"*": {"max_angle_deg": 2.0}}}
    # No file: the defaults of what ran.
    limits, judged = Tolerances().judge("fp16", "bf16", "normals")
    assert limits.max_angle_deg == 1.5 and judged.describe() == "fp16 asked, bf16 ran, bf16 defaults"
    # A user's fp16 limit is never loosened: with no bf16 entry it judges the bf16 run, over bf16's defaults.
    limits, judged = Tolerances(fp16_tight, source="ci/tol.json").judge("fp16", "bf16", "normals")
    assert limits.max_angle_deg == 0.3 and limits.min_cosine == PRECISIONS["bf16"].levels["cosine"]
    assert judged.describe(short=True) == "fp16 asked, bf16 ran, fp16 limits of tol.json over bf16 defaults"
    assert judged.to_dict() == {"precision_asked": "fp16", "precision_ran": "bf16", "precision_judged": "bf16",
                                "limits": "ci/tol.json", "limits_precision": "fp16"}
    # The user's entry for what ran comes first.
    limits, judged = Tolerances(bf16_own, source="ci/tol.json").judge("fp16", "bf16", "normals")
    assert limits.max_angle_deg == 2.0 and judged.describe(short=True) == "fp16 asked, bf16 ran, bf16 limits of tol.json"
    # An entry that does not reach this task (another task, or limits its kind has not) is not an entry for it.
    limits, judged = Tolerances(fp16_tight, source="ci/tol.json").judge("fp16", "bf16", "semseg")
    assert judged.limits == "defaults" and judged.limits_precision == "bf16"
    # An fp16 graph run by fp32 kernels: fp16's limits (a user's fp32 entry does not apply either).
    limits, judged = Tolerances({"fp32": {"*": {"max_abs": 1e-6}}}).judge("fp16", "fp32", "normals")
    assert limits == default_tolerance("fp16", "normals") and judged.describe() == "fp16 asked, fp32 ran, fp16 defaults"


SEMSEG = {"semseg": 3}


def _semseg_batches(n=2):
    rng = np.random.default_rng(3)
    for _ in range(n):
        ref = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
        yield EvalBatch(image=rng.normal(size=(2, 3, 8, 8)).astype(np.float32), reference={"semseg": ref},
                        labels={"semseg": ref.argmax(1).astype(np.int64)})


def _bf16_like(batches):
    """An engine whose semseg has a cosine of about 0.997 to the reference (fp16's floor is 0.999, bf16's
    0.99) and every pixel's class unchanged: the same noise is added to every class channel."""
    rng = np.random.default_rng(4)
    outputs = [{"semseg": b.reference["semseg"] + rng.normal(scale=0.07, size=(2, 1, 8, 8)).astype(np.float32)}
               for b in batches]
    calls = iter(outputs)
    return lambda feed: next(calls)


def _check(ran: str, tolerances: Tolerances | None = None):
    batches = list(_semseg_batches())
    return check_engine(_bf16_like(batches), batches, SEMSEG, "fp16", tolerances,
                        engine=EngineInfo("openvino", "fp16", ran))


def test_an_fp16_engine_that_ran_bf16_is_judged_by_bf16_defaults(tmp_path):
    result = _check("bf16")
    cosine = next(c for c in result.tasks["semseg"].checks if c.name == "cosine")
    assert 0.99 < cosine.value < 0.999 and cosine.limit == 0.99 and result.passed
    assert not _check("fp16").passed  # the same numbers, had fp16 run: fp16's defaults
    tight = tmp_path / "tol.json"
    tight.write_text(json.dumps({"fp16": {"semseg": {"min_cosine": 0.999}}}))
    assert not _check("bf16", Tolerances.from_file(tight)).passed  # a user's fp16 limit is not loosened
    # The report, the table, Markdown and JUnit say what was asked, what ran and whose limits judged.
    report = Report({"tasks": list(SEMSEG)}, [result, _check("bf16", Tolerances.from_file(tight))])
    for name, payload in report_files(report).items():
        (tmp_path / name).write_bytes(payload)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["engines"][0]["judged"] == [{"precision_asked": "fp16", "precision_ran": "bf16",
                                             "precision_judged": "bf16", "limits": "defaults",
                                             "limits_precision": "bf16", "tasks": ["semseg"]}]
    assert data["engines"][1]["tasks"]["semseg"]["judged"]["limits"] == str(tight)
    assert read_report(tmp_path).to_dict() == report.to_dict()
    table = format_table(report)
    assert "fp16 asked, bf16 ran, bf16 defaults" in table
    assert "fp16 asked, bf16 ran, fp16 limits of tol.json over bf16 defaults" in table
    assert "fp16 asked, bf16 ran, bf16 defaults" in format_markdown(report)
    suite = ET.parse(tmp_path / "junit.xml").getroot()[1]
    assert {p.get("name"): p.get("value") for p in suite.iter("property")}["precision_executed"] == "bf16"
    [failure] = suite.iter("failure")
    assert failure.get("message").endswith(f"(fp16 asked, bf16 ran, fp16 limits of {tight} over bf16 defaults)")


def test_a_report_of_an_older_version_still_reads_and_shows_asked_and_ran(tmp_path):
    data = _check("bf16").to_dict()
    data.pop("judged")
    data["tasks"]["semseg"].pop("judged")
    report = Report.from_dict({"format": "mtlora-export/report/1", "engines": [data]}, "old")
    assert report.engines[0].tasks["semseg"].judged is None and report.engines[0].describe_judged() == ""
    assert "fp16/bf16" in format_table(report)


# ----------------------------------------------------------------------------- a real engine


def test_a_real_openvino_fp16_engine_that_runs_bf16_is_judged_by_bf16_defaults(tmp_path, monkeypatch):
    """OpenVINO's "fp16" runs the fastest 16-bit format it measures; on a CPU with AMX-BF16 and no AMX-FP16
    that is bf16. The measurement is kept, the choice made bf16 as on such a CPU (this one may have both),
    so the engine really runs bf16 and the check reads that back from the compiled model."""
    import importlib

    ov = pytest.importorskip("openvino")
    from export.cli import main as export_cli

    openvino_build = importlib.import_module("engines.openvino.build")  # the module (the package exports `build`)

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: OpenVINO cannot run an engine in bf16 here")
    measured = openvino_build.fastest_inference_precision

    def bf16_wins(*args, **kwargs):
        return {**measured(*args, **kwargs), "chosen": "bf16"}

    monkeypatch.setattr(openvino_build, "fastest_inference_precision", bf16_wins)
    out = tmp_path / "build"
    code, output = invoke(export_cli, "build", "--backend", "openvino", "--precision", "fp16", "--eval-samples", "4",
                          "--out", out)
    assert code == 0, output
    assert "fp16 asked, bf16 ran, bf16 defaults" in output  # the terminal table
    [engine] = read_report(out).engines
    assert engine.engine.precision_requested == "fp16" and engine.engine.precision_executed == "bf16"
    assert engine.describe_judged() == "fp16 asked, bf16 ran, bf16 defaults"
    bf16 = PRECISIONS["bf16"].levels
    for task, result in engine.tasks.items():
        limits = {c.name: c.limit for c in result.checks}
        assert limits["cosine"] == bf16["cosine"], task
        if "angle_deg" in limits:
            assert limits["angle_deg"] == bf16["angle"]
    # A user's fp16 limits still judge it when the file has no bf16 entry; a bf16 entry comes first.
    tolerances = tmp_path / "tol.json"
    tolerances.write_text(json.dumps({"fp16": {"normals": {"max_angle_deg": 0.25}}}))
    code, output = invoke(export_cli, "check", out, "--tolerances", tolerances)
    normals = read_report(out).engines[0].tasks["normals"]
    assert normals.judged.describe(short=True) == "fp16 asked, bf16 ran, fp16 limits of tol.json over bf16 defaults"
    assert {c.name: c.limit for c in normals.checks}["angle_deg"] == 0.25
    tolerances.write_text(json.dumps({"fp16": {"normals": {"max_angle_deg": 0.25}},
                                      "bf16": {"normals": {"max_angle_deg": 3.0}}}))
    code, output = invoke(export_cli, "check", out, "--tolerances", tolerances)
    assert code == 0, output
    normals = read_report(out).engines[0].tasks["normals"]
    assert normals.judged.describe(short=True) == "fp16 asked, bf16 ran, bf16 limits of tol.json"
