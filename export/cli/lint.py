"""`mtlora-export lint`: check ONNX graphs for TensorRT without TensorRT or a GPU."""

from __future__ import annotations

import sys

import click

from engines.tensorrt.lint import TARGETS


@click.command("lint")
@click.argument("graphs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--target", "targets", multiple=True, type=click.Choice(TARGETS),
              help="TensorRT version to check against; repeat for several [default: all].")
def lint(graphs: tuple[str, ...], targets: tuple[str, ...]) -> None:
    """Check each GRAPH against what TensorRT's ONNX parser and strongly typed builder accept.

    Prints one line per finding (target, node, op, rule, what to do). Exit code 0 when every graph
    is clean for every target, 1 when there is any finding.
    """
    from engines.tensorrt.lint import format_findings, lint_targets

    count = 0
    for graph in graphs:
        for target, findings in lint_targets(graph, targets or TARGETS).items():
            if findings:
                click.echo(f"{graph}: " + format_findings(findings, target).replace("\n", f"\n{graph}: "))
            count += len(findings)
    chosen = ", ".join(targets or TARGETS)
    click.echo(f"{len(graphs)} graph(s) checked for {chosen}: "
               + ("clean" if count == 0 else f"{count} finding(s)"), err=True)
    sys.exit(1 if count else 0)
