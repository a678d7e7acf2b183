"""Accuracy judgement, reports and the baseline gate, on hand-made outputs."""

import json
import math
from xml.etree import ElementTree as ET

import numpy as np
import pytest

from export.checking.accuracy import EvalBatch, check_engine
from export.checking.baseline import compare_with_baseline
from export.checking.report import (
    format_table,
    read_report,
    report_files,
)
from export.checking.results import EngineCheck, EngineInfo, Report
from export.checking.tolerances import Tolerances
from export.errors import ExportError

CHANNELS = {"semseg": 3, "sal": 1, "normals": 3}


def _batches(n=2, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ref = {t: rng.normal(size=(2, c, 8, 8)).astype(np.float32) for t, c in CHANNELS.items()}
        lab = None
        if labels:
            lab = {"semseg": ref["semseg"].argmax(1).astype(np.int64),
                   "sal": (ref["sal"] > 0).astype(np.float32),
                   "normals": ref["normals"] / np.linalg.norm(ref["normals"], axis=1, keepdims=True)}
        yield EvalBatch(image=rng.normal(size=(2, 3, 8, 8)).astype(np.float32), reference=ref, labels=lab)


def _engine(noise, batches):
    # A deterministic "engine": the reference outputs plus a known perturbation.
    refs = [b.reference for b in batches]
    state = {"i": 0}

    def infer(feed):
        out = {t: v + noise for t, v in refs[state["i"]].items()}
        state["i"] += 1
        return out

    return infer


def test_identical_outputs_pass_fp32_with_exact_numbers():
    batches = list(_batches())
    result = check_engine(_engine(0.0, batches), batches, CHANNELS, "fp32", engine=EngineInfo("x", "fp32"))
    assert result.passed and bool(result)
    assert result.samples == 4 and result.labelled
    semseg = result.tasks["semseg"]
    assert semseg.tensor.max_abs == 0.0 and semseg.tensor.cosine == pytest.approx(1.0)
    assert semseg.agreement == 1.0
    assert semseg.metrics.engine["mIoU"] == pytest.approx(100.0)
    assert result.tasks["normals"].angle_deg == pytest.approx(0.0, abs=1e-5)


def test_small_offset_fails_fp32_max_abs_but_reports_value():
    batches = list(_batches())
    result = check_engine(_engine(2e-3, batches), batches, CHANNELS, "fp32")
    assert not result.passed
    failed = {c.name for c in result.tasks["sal"].failed}
    assert failed == {"max_abs"}
    assert result.tasks["sal"].tensor.max_abs == pytest.approx(2e-3, rel=1e-3)


def test_non_finite_engine_output_fails():
    batches = list(_batches(1))
    result = check_engine(_engine(np.float32("nan"), batches), batches, CHANNELS, "fp16")
    assert not result.passed
    assert math.isinf(result.tasks["semseg"].tensor.max_abs)


def test_tolerance_override_file(tmp_path):
    path = tmp_path / "tol.json"
    path.write_text(json.dumps({"fp32": {"*": {"max_abs": 0.01}}}))
    batches = list(_batches())
    assert check_engine(_engine(2e-3, batches), batches, CHANNELS, "fp32", Tolerances.from_file(path)).passed
    path.write_text(json.dumps({"fp32": {"semseg": {"max_abss": 1}}}))
    with pytest.raises(ExportError, match="unknown limit"):
        Tolerances.from_file(path)


def test_empty_evaluation_set_is_an_error():
    with pytest.raises(ExportError, match="empty"):
        check_engine(lambda feed: {}, [], CHANNELS, "fp32")


def test_reports_and_baseline_gate(tmp_path):
    batches = list(_batches())
    info = EngineInfo("onnxruntime", "fp16", "fp16")
    identity = {"tasks": list(CHANNELS), "output_channels": dict(CHANNELS), "input_size": 16, "source_sha256": "a" * 64}
    good = Report({"tasks": list(CHANNELS)}, [check_engine(_engine(0.0, batches), batches, CHANNELS, "fp16", engine=info)],
                  identity=identity)
    for name, payload in report_files(good).items():
        (tmp_path / name).write_bytes(payload)
    stored = read_report(tmp_path)
    assert stored.passed is True and stored.to_dict() == good.to_dict()
    suites = ET.parse(tmp_path / "junit.xml").getroot()
    assert suites[0].get("name") == "onnxruntime-fp16" and suites[0].get("failures") == "0"
    assert "semseg" in (tmp_path / "summary.md").read_text()
    assert "PASS" in format_table(good)
    gate = compare_with_baseline(good, good)
    assert gate.passed and gate.compared == len(CHANNELS)
    # Flip a third of the class maps: mIoU and agreement collapse, so the gate must fail.
    worse = list(_batches())
    for b in worse:
        b.reference["semseg"] = b.reference["semseg"].copy()
    bad_batches = list(_batches())
    def infer(feed, it=iter(bad_batches)):
        out = dict(next(it).reference)
        out["semseg"] = np.roll(out["semseg"], 1, axis=1)
        return out
    bad = Report({"tasks": list(CHANNELS)}, [check_engine(infer, worse, CHANNELS, "fp16", engine=info)],
                 identity=identity)
    problems = compare_with_baseline(bad, good).regressions
    assert any("semseg: mIoU" in p for p in problems) and any("argmax_agreement" in p for p in problems)


def test_baseline_reports_missing_engine():
    identity = {"tasks": ["sal"], "output_channels": {"sal": 1}, "input_size": 16, "source_sha256": "a" * 64}
    report = Report({}, [], identity=identity)
    baseline = Report({}, [EngineCheck(EngineInfo("openvino", "int8"), 1, False, "pytorch", {})], identity=identity)
    assert compare_with_baseline(report, baseline).regressions == ["openvino-int8: in the baseline but not built now"]


def test_read_report_rejects_other_json(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(ExportError, match="not an mtlora-export accuracy report"):
        read_report(tmp_path)
