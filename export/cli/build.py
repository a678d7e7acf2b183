"""`mtlora-export build` and `mtlora-export check`."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import click

from engines.registry import BACKENDS
from export.cli import main
from export.errors import ExportError

BACKEND_CHOICES = ["auto", "all", *BACKENDS]
PRECISION_CHOICES = ["fp32", "fp16", "bf16", "int8", "all"]


def _say(line: str) -> None:
    click.echo(line, err=True)


def _apply_project_config(ctx: click.Context, options: dict) -> dict:
    """Fill options the user did not give from ./mtlora-export.json, if present."""
    from export.pipeline.build import BuildOptions
    from export.pipeline.sources import read_project_config

    project = read_project_config()
    if not project:
        return options
    known = {f.name for f in fields(BuildOptions)}
    aliases = {"precision": "precisions", "backend": "backends"}
    for raw_key, value in project.items():
        if raw_key == "_path":
            continue
        key = aliases.get(raw_key, raw_key)
        if key not in known:
            raise ExportError(f"{project['_path']}: unknown option '{raw_key}'")
        source = ctx.get_parameter_source(raw_key if raw_key in ctx.params else key)
        if key == "checkpoint" and options.get("checkpoint") is None:
            options["checkpoint"] = str(Path(project["_path"]).parent / value)
        elif source in (None, click.core.ParameterSource.DEFAULT):
            options[key] = tuple(value) if isinstance(value, list) else value
    _say(f"using options from {project['_path']}")
    return options


@main.command("build")
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--precision", "precisions", multiple=True, default=("fp16",), show_default=True,
              type=click.Choice(PRECISION_CHOICES), help="Engine precision; repeat for several, or 'all'.")
@click.option("--backend", "backends", multiple=True, default=("auto",), show_default=True,
              type=click.Choice(BACKEND_CHOICES),
              help="auto = TensorRT if usable, else OpenVINO, else ONNX Runtime; repeat for several, or 'all'.")
@click.option("--layout", type=click.Choice(["single", "split"]), default="single", show_default=True,
              help="One graph, or a shared backbone plus one head per task.")
@click.option("--tasks", help="Comma-separated subset of the model's tasks.")
@click.option("--img-size", type=int, help="Input size (default: the model's).")
@click.option("--calib-data", help="INT8 calibration data: synthetic[:split], pascal:ROOT[:split], nyud:ROOT, or an image directory.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--calib-method", type=click.Choice(["percentile", "minmax", "entropy"]), default="percentile", show_default=True)
@click.option("--eval-data", help="Evaluation data (same forms as --calib-data, or an evalset .npz).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--keep-fp32", multiple=True, help="Glob over node names or op types to keep in fp32 (repeatable).")
@click.option("--tolerances", type=click.Path(dir_okay=False), help="JSON file of per-precision, per-task limits.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for the engines.")
@click.option("--from-bundle", type=click.Path(file_okay=False), help="Build on a device from a bundle (no PyTorch needed).")
@click.option("--out", default="build", show_default=True, type=click.Path(), help="Build directory.")
@click.pass_context
def build(ctx: click.Context, checkpoint, precisions, backends, layout, tasks, img_size, calib_data, calib_samples,
          calib_method, eval_data, eval_samples, batch_size, keep_fp32, tolerances, threads, from_bundle, out) -> None:
    """Merge, export, calibrate, build engines and check them against PyTorch, reusing finished steps.

    Without CHECKPOINT: ./mtlora-export.json if present, else the embedded default model.
    Exit code 0 when every accuracy check passes, 1 when any fails.
    """
    from export.checking.report import format_table
    from export.pipeline.build import BuildOptions, run_build

    if checkpoint and from_bundle:
        raise click.BadParameter("give either CHECKPOINT or --from-bundle, not both", param_hint="--from-bundle")
    options = dict(checkpoint=checkpoint, precisions=precisions, backends=backends, layout=layout,
                   tasks=tuple(t.strip() for t in tasks.split(",")) if tasks else None, img_size=img_size,
                   calib_data=calib_data, calib_samples=calib_samples, calib_method=calib_method,
                   eval_data=eval_data, eval_samples=eval_samples, batch_size=batch_size, keep_fp32=keep_fp32,
                   tolerances=tolerances, threads=threads, from_bundle=from_bundle, out=out)
    if not from_bundle:
        options = _apply_project_config(ctx, options)
    outcome = run_build(BuildOptions(**options), _say)
    click.echo(format_table(outcome.report))
    status = "PASSED" if outcome.passed else "FAILED"
    click.echo(f"\n{status}: reports in {outcome.out}/report.json, junit.xml, summary.md, report.html")
    sys.exit(0 if outcome.passed else 1)


@main.command("check")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--baseline", type=click.Path(dir_okay=False), help="A stored report.json; fail on any regression against it.")
@click.option("--eval-data", help="Evaluation data to use instead of the build's.")
@click.option("--tolerances", type=click.Path(dir_okay=False), help="JSON file of per-precision, per-task limits.")
@click.option("--threads", type=click.IntRange(min=1))
def check(build_dir, baseline, eval_data, tolerances, threads) -> None:
    """Re-run the accuracy checks of BUILD_DIR (and compare with a baseline report: the CI gate)."""
    from export.checking.report import compare_with_baseline, format_table, read_report
    from export.pipeline.build import run_check

    stored = read_report(baseline) if baseline else None
    report = run_check(build_dir, _say, eval_data=eval_data, tolerances=tolerances, threads=threads)
    click.echo(format_table(report))
    passed = report["passed"]
    if stored is not None:
        problems = compare_with_baseline(report, stored)
        for line in problems:
            click.echo(f"REGRESSION {line}")
        passed = passed and not problems
        click.echo(f"baseline {baseline}: {'no regressions' if not problems else f'{len(problems)} regression(s)'}")
    click.echo(f"\n{'PASSED' if passed else 'FAILED'}: reports in {build_dir}")
    sys.exit(0 if passed else 1)
