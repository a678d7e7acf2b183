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


HEADER = ["backend", "precision: asked, ran, limits", "task", "max abs", "cosine", "agree/angle", "metric vs labels",
          "verdict"]


def _precision_cell(info, result) -> str:
    """What was asked, what ran and whose limits judged the task ('fp16 asked, bf16 ran, bf16 defaults');
    a report of an older version, which does not say whose, shows asked/ran."""
    if result.judged is None:
        return f"{info.precision_requested}/{info.precision_executed or '?'}"
    return result.judged.describe(short=True)


def rows(report: Report) -> list[list[str]]:
    """One row per engine and task: the numbers people look at first."""
    out = []
    for engine in report.engines:
        info = engine.engine
        # A per-part engine set's rows say each task's path; its backend cell names the plan.
        backend = f"{info.backend} ({info.precision_requested})" if "=" in info.precision_requested else info.backend
        for task, result in engine.tasks.items():
            metric = ""
            if result.metrics:
                name = result.metrics.primary
                metric = f"{name} {result.metrics.engine[name]:.2f} (ref {result.metrics.reference[name]:.2f})"
            failed = [c.name for c in result.failed]
            out.append([
                backend,
                _precision_cell(info, result),
                task,
                _fmt(result.tensor.max_abs),
                _fmt(result.tensor.cosine),
                _fmt(result.agreement if result.agreement is not None else result.angle_deg),
                metric,
                "PASS" if not failed else "FAIL " + ",".join(failed),
            ])
    return out


def plain_table(header: list[str], body: list[list[str]]) -> str:
    """A terminal table: columns padded to their widest cell, a dashed rule under the header."""
    table = [header] + body
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body)]


def format_table(report: Report) -> str:
    return plain_table(HEADER, rows(report))


# --------------------------------------------------------------------------- int8 fallback, --precision auto

FALLBACK_HEADER = ["engine", "verdict", "failing task: check before -> after", "kept in fp32", "latency ms"]
CANDIDATE_HEADER = ["backend", "candidate", "ran", "latency ms", "size", "metric drop per task", "verdict"]


def _latencies(latency: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:.3g}" for name, ms in latency.items())


def fallback_rows(report: Report) -> list[list[str]]:
    """One row per engine set the fallback (int8 or 16-bit) worked on."""
    return [[f.engine, f.verdict + (" (cached)" if f.cached else ""), "; ".join(t.describe() for t in f.tasks),
             str(len(f.layers)), _latencies(f.latency_ms)] for f in report.fallbacks]


def fallback_layer_lines(report: Report) -> list[str]:
    """One line per layer kept in fp32: which task and check it was kept for, what it bought."""
    lines = []
    for f in report.fallbacks:
        for layer in f.layers:
            role = "" if layer.role == "model" else f" [{layer.role}]"
            lines.append(f"{f.engine}: {layer.node}{role} for {layer.task} {layer.check} "
                         f"{layer.before:.4g} -> {layer.after:.4g} (local error {layer.local_error:.3g})")
        lines.append(f"{f.engine}: {f.message}" + (f" ({f.probes} int8 variants judged; {f.seconds:.1f} s in all)"
                                                    if f.probes else ""))
        if f.file:
            lines.append(f"{f.engine}: layer list in {f.file} (reuse: --keep-fp32 @{f.file})")
    return lines


def _size(n: int) -> str:
    return f"{n / (1 << 20):.3g} MiB" if n >= 1 << 20 else f"{n / 1024:.3g} KiB"


def _drops(check) -> str:
    parts = []
    for task, result in check.tasks.items():
        if result.metrics is not None:
            parts.append(f"{task} {result.metrics.drop:+.2f}".replace("-0.00", "+0.00"))
        else:
            parts.append(f"{task} cos {result.tensor.cosine:.4g}")
    return ", ".join(parts)


def candidate_rows(report: Report) -> list[list[str]]:
    """One row per `--precision auto` candidate."""
    if report.auto is None:
        return []
    out = []
    for c in report.auto.candidates:
        verdict = ("PASS" if c.passed else "FAIL") + (" (chosen)" if c.chosen else "")
        out.append([c.backend, c.name, c.check.engine.precision_executed or "?",
                    "" if c.latency_ms is None else f"{c.latency_ms:.3g}", _size(c.size_bytes), _drops(c.check),
                    verdict + (f"; {c.note}" if c.note else "")])
    return out


def auto_line(report: Report) -> str:
    auto = report.auto
    flags = " ".join(f for f, on in auto.cpu_flags.items() if on) or "none of note"
    threads = auto.threads if auto.threads is not None else "the runtime's default"
    return (f"--precision auto: batch {auto.batch}, median of {auto.runs} calls, {threads} threads, on "
            f"{auto.cpu or 'this CPU'} (flags: {flags})")


def format_sections(report: Report) -> str:
    """The fallback, the auto candidates and the notes, for the terminal (empty when none)."""
    parts = []
    if report.fallbacks:
        lines = ["Fallback (layers kept in fp32):", plain_table(FALLBACK_HEADER, fallback_rows(report))]
        lines += [f"  {line}" for line in fallback_layer_lines(report)]
        parts.append("\n".join(lines))
    if report.auto is not None:
        parts.append("\n".join([auto_line(report), plain_table(CANDIDATE_HEADER, candidate_rows(report))]))
    if report.notes:
        parts.append("\n".join(f"note: {n}" for n in report.notes))
    return "\n\n".join(parts)


def format_markdown(report: Report) -> str:
    status = "passed" if report.passed else "FAILED"
    lines = [f"# Accuracy report: {status}", "", f"Model tasks: {', '.join(report.tasks)}", ""]
    lines += _markdown_table(HEADER, rows(report))
    for engine in report.engines:
        lines.append("")
        judged = engine.describe_judged()
        lines.append(f"- {engine.key}: {engine.samples} samples, "
                     f"{'labelled' if engine.labelled else 'no labels'}, reference from {engine.reference_source}"
                     + (f"; {judged}" if judged else ""))
    if report.fallbacks:
        lines += ["", "## Fallback (layers kept in fp32)", ""]
        lines += _markdown_table(FALLBACK_HEADER, fallback_rows(report))
        lines += [""] + [f"- {line}" for line in fallback_layer_lines(report)]
    if report.auto is not None:
        lines += ["", "## Precision auto: candidates", "", auto_line(report), ""]
        lines += _markdown_table(CANDIDATE_HEADER, candidate_rows(report))
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def format_junit(report: Report) -> str:
    suites = ET.Element("testsuites", name="mtlora-export accuracy")
    for engine in report.engines:
        cases = [(task, c) for task, result in engine.tasks.items() for c in result.checks]
        suite = ET.SubElement(suites, "testsuite", name=engine.key, tests=str(len(cases)),
                              failures=str(sum(not c.passed for _, c in cases)))
        properties = ET.SubElement(suite, "properties")
        info = engine.engine
        for name, value in (("precision_requested", info.precision_requested),
                            ("precision_executed", info.precision_executed), ("judged", engine.describe_judged())):
            if value:
                ET.SubElement(properties, "property", name=name, value=value)
        for task, c in cases:
            case = ET.SubElement(suite, "testcase", classname=engine.key, name=f"{task}.{c.name}")
            if not c.passed:
                judged = engine.tasks[task].judged
                whose = f" ({judged.describe()})" if judged is not None else ""
                failure = ET.SubElement(case, "failure",
                                        message=f"{c.name} = {_fmt(c.value)}, limit {c.op} {c.limit}{whose}")
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
