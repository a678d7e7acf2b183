"""`report.html`: one self-contained page (images inlined) with the accuracy table and sample maps."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.checking.report import (
    CANDIDATE_HEADER,
    FALLBACK_HEADER,
    HEADER,
    auto_line,
    candidate_rows,
    fallback_layer_lines,
    fallback_rows,
    rows,
)
from export.checking.results import Report
from export.checking.visualize import denormalize, error_map, png_data_uri, render_label, render_output

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .5rem;font-size:.85rem}
th{background:#f3f3f3}.pass{color:#176b2c;font-weight:600}.fail{color:#b00020;font-weight:600}
figure{display:inline-block;margin:.2rem .4rem;text-align:center}figcaption{font-size:.75rem;max-width:12rem}
img{image-rendering:pixelated;border:1px solid #ddd}h3{margin-top:1.5rem}
"""


@dataclass
class Sample:
    """One evaluation image with everything the page shows for it."""

    image: np.ndarray  # normalised (3, H, W)
    reference: dict[str, np.ndarray]  # task -> (C, H, W)
    engines: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # engine key -> task -> (C, H, W)
    labels: dict[str, np.ndarray] | None = None
    # task -> the kind of the engines' outputs when they are post-processed in the graph (the reference
    # is then shown post-processed too); empty: raw outputs.
    kinds: dict[str, str] = field(default_factory=dict)


def _figure(rgb: np.ndarray, caption: str, scale: int) -> str:
    return (f'<figure><img src="{png_data_uri(rgb, scale)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(report: Report) -> str:
    return _html_table(HEADER, rows(report), lambda verdict: verdict == "PASS")


def _html_table(header: list[str], body: list[list[str]], good) -> str:
    """A table whose last column is a verdict, coloured by `good(verdict)`."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for row in body:
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row[:-1])
        css = "pass" if good(row[-1]) else "fail"
        lines.append(f'<tr>{cells}<td class="{css}">{html.escape(row[-1])}</td></tr>')
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def _sections(report: Report) -> list[str]:
    """The fallback, the auto candidates and the notes, when there are any."""
    parts = []
    if report.fallbacks:
        # Verdict last, so it is coloured like the accuracy table's.
        body = [[*r[:1], *r[2:], r[1]] for r in fallback_rows(report)]
        parts.append("<h2>Fallback (layers kept in fp32)</h2>")
        parts.append(_html_table([*FALLBACK_HEADER[:1], *FALLBACK_HEADER[2:], FALLBACK_HEADER[1]], body,
                                 lambda v: v.startswith("fixed")))
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in fallback_layer_lines(report))
                     + "</ul>")
    if report.auto is not None:
        parts.append("<h2>Precision auto: candidates</h2>")
        parts.append(f"<p>{html.escape(auto_line(report))}</p>")
        parts.append(_html_table(CANDIDATE_HEADER, candidate_rows(report), lambda v: v.startswith("PASS")))
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    return parts


def render_html(report: Report, samples: list[Sample], mean, std, curves_png: Path | None = None) -> str:
    status = "passed" if report.passed else "FAILED"
    css_status = "pass" if report.passed else "fail"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mtlora-export accuracy report</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Accuracy report: <span class='{css_status}'>{status}</span></h1>",
        f"<p>Tasks: {html.escape(', '.join(report.tasks))}. Created {html.escape(report.created)}.</p>",
        _table(report),
    ]
    for engine in report.engines:
        judged = engine.describe_judged() or f"precision that ran: {engine.engine.precision_executed or '?'}"
        parts.append(f"<p>{html.escape(engine.key)}: {engine.samples} samples, "
                     f"reference from {html.escape(engine.reference_source)}, {html.escape(judged)}</p>")
    parts += _sections(report)
    for index, sample in enumerate(samples):
        size = sample.image.shape[-1]
        scale = max(1, 160 // max(size, 1))
        parts.append(f"<h2>Sample {index + 1}</h2>")
        parts.append(_figure(denormalize(sample.image, mean, std), "input", scale))
        for task, reference in sample.reference.items():
            parts.append(f"<h3>{html.escape(task)}</h3><div>")
            if sample.labels is not None and task in sample.labels:
                parts.append(_figure(render_label(task, sample.labels[task]), "ground truth", scale))
            kind = sample.kinds.get(task)
            parts.append(_figure(render_output(task, reference, kind), "PyTorch", scale))
            for key, outputs in sample.engines.items():
                if task in outputs:
                    parts.append(_figure(render_output(task, outputs[task], kind), key, scale))
                    err, legend = error_map(task, outputs[task], reference, kind)
                    parts.append(_figure(err, f"{key} error: {legend}", scale))
            parts.append("</div>")
    if curves_png is not None and Path(curves_png).is_file():
        data = base64.b64encode(Path(curves_png).read_bytes()).decode("ascii")
        parts.append(f"<h2>Training curves</h2><img src='data:image/png;base64,{data}' alt='training curves' style='max-width:100%'>")
    parts.append("</body></html>")
    return "\n".join(parts)
