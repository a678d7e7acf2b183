"""Accuracy reports: JSON for machines, JUnit XML for CI systems, Markdown and a terminal table for people."""

from __future__ import annotations

import json
import math
from pathlib import Path
from xml.etree import ElementTree as ET

from export.artifacts.builddir import BuildDir
from export.artifacts.files import read_json
from export.checking.results import Report


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}"
    return "" if value is None else str(value)


HEADER = ["backend", "precision (asked/ran)", "task", "max abs", "cosine", "agree/angle", "metric vs labels", "verdict"]


def rows(report: Report) -> list[list[str]]:
    """One row per engine and task: the numbers people look at first."""
    out = []
    for engine in report.engines:
        info = engine.engine
        for task, result in engine.tasks.items():
            metric = ""
            if result.metrics:
                name = result.metrics.primary
                metric = f"{name} {result.metrics.engine[name]:.2f} (ref {result.metrics.reference[name]:.2f})"
            failed = [c.name for c in result.failed]
            out.append([
                info.backend,
                f"{info.precision_requested}/{info.precision_executed or '?'}",
                task,
                _fmt(result.tensor.max_abs),
                _fmt(result.tensor.cosine),
                _fmt(result.agreement if result.agreement is not None else result.angle_deg),
                metric,
                "PASS" if not failed else "FAIL " + ",".join(failed),
            ])
    return out


def format_table(report: Report) -> str:
    table = [HEADER] + rows(report)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(report: Report) -> str:
    status = "passed" if report.passed else "FAILED"
    lines = [f"# Accuracy report: {status}", "", f"Model tasks: {', '.join(report.tasks)}", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    for engine in report.engines:
        lines.append("")
        lines.append(f"- {engine.key}: {engine.samples} samples, "
                     f"{'labelled' if engine.labelled else 'no labels'}, reference from {engine.reference_source}")
    return "\n".join(lines) + "\n"


def format_junit(report: Report) -> str:
    suites = ET.Element("testsuites", name="mtlora-export accuracy")
    for engine in report.engines:
        cases = [(task, c) for task, result in engine.tasks.items() for c in result.checks]
        suite = ET.SubElement(suites, "testsuite", name=engine.key, tests=str(len(cases)),
                              failures=str(sum(not c.passed for _, c in cases)))
        for task, c in cases:
            case = ET.SubElement(suite, "testcase", classname=engine.key, name=f"{task}.{c.name}")
            if not c.passed:
                failure = ET.SubElement(case, "failure", message=f"{c.name} = {_fmt(c.value)}, limit {c.op} {c.limit}")
                failure.text = json.dumps(c.to_dict())
    return ET.tostring(suites, encoding="unicode") + "\n"


def report_files(report: Report) -> dict[str, bytes]:
    """The machine- and CI-readable records of a report, by file name (the HTML page comes from
    `export.checking.html`, which needs the sample images)."""
    return {
        BuildDir.REPORT: (json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str) + "\n").encode(),
        BuildDir.JUNIT: format_junit(report).encode(),
        BuildDir.SUMMARY: format_markdown(report).encode(),
    }


def read_report(path: str | Path) -> Report:
    path = Path(path)
    if path.is_dir():
        path = path / BuildDir.REPORT
    data = read_json(path, corrupt=f"{path}: not a valid report",
                     missing=f"{path}: no such report; run 'mtlora-export build' or 'check' first")
    return Report.from_dict(data, str(path))
