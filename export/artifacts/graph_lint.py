"""Every graph a build writes, checked for each TensorRT release (`engines.tensorrt.lint`).

A build on a workstation without TensorRT still says whether its graphs would
import on a Jetson; the verdict goes into build.json and into a bundle's index.
Each graph is checked for the releases it is meant for (its metadata says which
engines take it, `engines.graph_purpose`); ONNX Runtime's uint8 Q/DQ graph is
recorded as not meant for TensorRT, with the graph TensorRT takes instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Say = Callable[[str], None]


def lint_graphs(root: Path, graphs: list[Path], say: Say) -> dict[str, dict]:
    """{graph path relative to `root`: {target: {"clean", "findings"} or {"clean": None, "not_for"}}},
    with one line said per graph that has findings (and one line in all when every graph is clean)."""
    from engines.tensorrt.lint import TARGETS, lint_purpose

    verdicts = {}
    dirty = 0
    for graph in graphs:
        result = lint_purpose(graph, TARGETS)
        name = graph.relative_to(root).as_posix()
        verdicts[name] = result.summary()
        bad = {t: f for t, f in result.findings.items() if f}
        if bad:
            dirty += 1
            target, findings = next(iter(bad.items()))
            say(f"[lint] {name}: {result.count} TensorRT finding(s) "
                f"({', '.join(bad)}), e.g. {findings[0].line(target)}")
    if graphs and not dirty:
        say(f"[lint] {len(graphs)} graph(s) lint clean for the TensorRT releases each is meant for "
            f"({', '.join(TARGETS)})")
    return verdicts


def build_graphs(root: Path) -> list[Path]:
    """The ONNX graphs of a build or bundle directory: the export and the prepared graphs."""
    from export.artifacts.builddir import BuildDir

    return sorted(p for sub in (BuildDir.EXPORT, BuildDir.GRAPHS) for p in (root / sub).rglob("*.onnx")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts))
