"""Every graph a build writes, checked for each TensorRT version (`engines.tensorrt.lint`).

A build on a workstation without TensorRT still says whether its graphs would
import on a Jetson; the verdict goes into build.json and into a bundle's index.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Say = Callable[[str], None]


def lint_graphs(root: Path, graphs: list[Path], say: Say) -> dict[str, dict]:
    """{graph path relative to `root`: {target: {"clean", "findings"}}}, with one line said per graph
    that has findings (and one line in all when every graph is clean)."""
    from engines.tensorrt.lint import TARGETS, lint_targets, summary

    verdicts = {}
    dirty = 0
    for graph in graphs:
        found = lint_targets(graph, TARGETS)
        name = graph.relative_to(root).as_posix()
        verdicts[name] = summary(found)
        bad = {t: f for t, f in found.items() if f}
        if bad:
            dirty += 1
            target, findings = next(iter(bad.items()))
            say(f"[lint] {name}: {sum(len(f) for f in bad.values())} TensorRT finding(s) "
                f"({', '.join(bad)}), e.g. {findings[0].line(target)}")
    if graphs and not dirty:
        say(f"[lint] {len(graphs)} graph(s) lint clean for {', '.join(TARGETS)}")
    return verdicts


# Prepared graphs TensorRT would not build from: ONNX Runtime's uint8-activation Q/DQ flavour.
NOT_FOR_TENSORRT = ("qdq_u8",)


def build_graphs(root: Path) -> list[Path]:
    """The ONNX graphs of a build or bundle directory that TensorRT could build from: the export and the
    prepared fp16 and signed Q/DQ graphs."""
    from export.artifacts.builddir import BuildDir

    return sorted(p for sub in (BuildDir.EXPORT, BuildDir.GRAPHS) for p in (root / sub).rglob("*.onnx")
                  if not any(part.startswith(".") or part in NOT_FOR_TENSORRT for part in p.relative_to(root).parts))
