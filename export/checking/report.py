"""Accuracy reports: JSON for machines, JUnit XML for CI systems, Markdown and a terminal table for people.

Also the CI regression gate: compare a new report with a stored baseline and
fail on any task metric that got worse by more than its tolerance.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from xml.etree import ElementTree as ET

from engines.files import write_atomic
from export.artifacts.manifest import read_json
from export.errors import ExportError

REPORT_FORMAT = "mtlora-export/report/1"
REPORT_FILE, JUNIT_FILE, SUMMARY_FILE = "report.json", "junit.xml", "summary.md"

# How far a value may move against a baseline before the gate fails.
BASELINE_SLACK = {"argmax_agreement": 0.01, "angle_deg": 0.5, "cosine": 1e-3}
DEFAULT_METRIC_SLACK = 0.5


def engine_key(engine: dict) -> str:
    return f"{engine.get('backend')}-{engine.get('precision_requested')}"


def build_report(checks: list, model: dict) -> dict:
    engines = [c.to_dict() if hasattr(c, "to_dict") else c for c in checks]
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model,
        "engines": engines,
        "passed": all(e["passed"] for e in engines),
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def rows(report: dict) -> list[list[str]]:
    """One row per engine and task: the numbers people look at first."""
    out = []
    for engine in report["engines"]:
        info = engine["engine"]
        for task, data in engine["tasks"].items():
            metrics = data.get("metrics")
            metric = ""
            if metrics:
                name = metrics["primary"]
                metric = f"{name} {metrics['engine'][name]:.2f} (ref {metrics['reference'][name]:.2f})"
            failed = [c["name"] for c in data["checks"] if not c["passed"]]
            out.append([
                info.get("backend", "?"),
                f"{info.get('precision_requested', '?')}/{info.get('precision_executed', '?')}",
                task,
                _fmt(data["tensor"]["max_abs"]),
                _fmt(data["tensor"]["cosine"]),
                _fmt(data.get("argmax_agreement", data.get("angle_deg", ""))),
                metric,
                "PASS" if not failed else "FAIL " + ",".join(failed),
            ])
    return out


HEADER = ["backend", "precision (asked/ran)", "task", "max abs", "cosine", "agree/angle", "metric vs labels", "verdict"]


def format_table(report: dict) -> str:
    table = [HEADER] + rows(report)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    status = "passed" if report["passed"] else "FAILED"
    lines = [f"# Accuracy report: {status}", "", f"Model tasks: {', '.join(report['model'].get('tasks', []))}", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    for engine in report["engines"]:
        info = engine["engine"]
        lines.append("")
        lines.append(f"- {engine_key(info)}: {engine['samples']} samples, "
                     f"{'labelled' if engine['labelled'] else 'no labels'}, reference from {engine['reference']}")
    return "\n".join(lines) + "\n"


def format_junit(report: dict) -> str:
    suites = ET.Element("testsuites", name="mtlora-export accuracy")
    for engine in report["engines"]:
        cases = [(task, c) for task, data in engine["tasks"].items() for c in data["checks"]]
        suite = ET.SubElement(suites, "testsuite", name=engine_key(engine["engine"]), tests=str(len(cases)),
                              failures=str(sum(not c["passed"] for _, c in cases)))
        for task, c in cases:
            case = ET.SubElement(suite, "testcase", classname=engine_key(engine["engine"]), name=f"{task}.{c['name']}")
            if not c["passed"]:
                failure = ET.SubElement(case, "failure", message=f"{c['name']} = {_fmt(c['value'])}, limit {c['op']} {c['limit']}")
                failure.text = json.dumps(c)
    return ET.tostring(suites, encoding="unicode") + "\n"


def write_reports(report: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    return [
        write_atomic(out_dir / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n"),
        write_atomic(out_dir / JUNIT_FILE, format_junit(report)),
        write_atomic(out_dir / SUMMARY_FILE, format_markdown(report)),
    ]


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_report(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    data = read_json(path, corrupt=f"{path}: not a valid report",
                     missing=f"{path}: no such report; run 'mtlora-export build' or 'check' first")
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ExportError(f"{path}: not an mtlora-export accuracy report (format {REPORT_FORMAT})")
    return data


def compare_with_baseline(report: dict, baseline: dict, metric_slack: dict[str, float] | None = None) -> list[str]:
    """Regressions of `report` against `baseline`, as one line each; empty when the gate passes.

    `metric_slack` maps an engine key (e.g. 'openvino-int8') to how many points its
    primary task metrics may lose; the default is each check's own metric-drop limit.
    """
    problems = []
    current = {engine_key(e["engine"]): e for e in report["engines"]}
    for stored in baseline["engines"]:
        key = engine_key(stored["engine"])
        engine = current.get(key)
        if engine is None:
            problems.append(f"{key}: in the baseline but not built now")
            continue
        for task, old in stored["tasks"].items():
            new = engine["tasks"].get(task)
            if new is None:
                problems.append(f"{key}/{task}: task missing from the new report")
                continue
            if "metrics" in old and "metrics" in new:
                name = old["metrics"]["primary"]
                higher = old["metrics"]["higher_is_better"]
                limit = (metric_slack or {}).get(key)
                if limit is None:
                    limits = [c["limit"] for c in new["checks"] if c["name"].endswith("_drop")]
                    limit = limits[0] if limits else DEFAULT_METRIC_SLACK
                before, after = old["metrics"]["engine"][name], new["metrics"]["engine"][name]
                worse = (before - after) if higher else (after - before)
                if not math.isfinite(after) or worse > limit:
                    problems.append(f"{key}/{task}: {name} {after:.3f} vs baseline {before:.3f} (worse by {worse:.3f} > {limit})")
            for name, slack in BASELINE_SLACK.items():
                before = old.get(name, old["tensor"].get(name))
                after = new.get(name, new["tensor"].get(name))
                if before is None or after is None:
                    continue
                worse = (after - before) if name == "angle_deg" else (before - after)
                if not math.isfinite(after) or worse > slack:
                    problems.append(f"{key}/{task}: {name} {after:.4f} vs baseline {before:.4f} (worse by {worse:.4f} > {slack})")
    return problems
