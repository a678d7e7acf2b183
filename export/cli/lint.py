"""`mtlora-export lint`: check ONNX graphs for TensorRT without TensorRT or a GPU."""

from __future__ import annotations

import sys

import click

from engines.tensorrt.lint import NOT_FOR_TENSORRT_EXIT, TARGETS


@click.command("lint")
@click.argument("graphs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--target", "targets", multiple=True, type=click.Choice(TARGETS),
              help="TensorRT release to check against; repeat for several [default: all].")
@click.option("--dla", is_flag=True,
              help="Also say, per graph (a split layout's head), which layers a DLA core could not run and "
                   "would hand back to the GPU (for build --dla heads).")
def lint(graphs: tuple[str, ...], targets: tuple[str, ...], dla: bool) -> None:
    """Check each GRAPH against what TensorRT's ONNX parser and strongly typed builder accept.

    A graph is checked only for the targets its metadata says it is meant for (a build records
    which engines take each graph it writes); for the others, one line names the graph TensorRT
    takes from the same build. Prints one line per finding (target, node, op, rule, what to do).

    With --dla, one more line per graph: how many of its layers a DLA core would run, and which
    fall back to the GPU (informational; it does not change the exit code).

    Exit code 0 when every graph is clean for the targets it is meant for, 1 when there is any
    finding, 3 when there is none but some graph is meant for none of the targets (ONNX Runtime's
    uint8 Q/DQ graph, for instance).
    """
    from engines.tensorrt.lint import format_findings, lint_purpose

    count, foreign = 0, 0
    for graph in graphs:
        if dla:
            from engines.files import load_onnx
            from engines.tensorrt.dla import dla_report

            click.echo(dla_report(load_onnx(graph), graph).line())
        result = lint_purpose(graph, targets or TARGETS)
        if result.note:
            click.echo(f"{graph}: {result.note}")
        foreign += not result.findings
        for target, findings in result.findings.items():
            if findings:
                click.echo(f"{graph}: " + format_findings(findings, target).replace("\n", f"\n{graph}: "))
            count += len(findings)
    chosen = ", ".join(targets or TARGETS)
    verdict = f"{count} finding(s)" if count else "clean"
    if foreign:
        verdict += f"; {foreign} graph(s) meant for none of them"
    click.echo(f"{len(graphs)} graph(s) checked for {chosen}: {verdict}", err=True)
    sys.exit(1 if count else NOT_FOR_TENSORRT_EXIT if foreign else 0)
