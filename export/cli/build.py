"""`mtlora-export build` and `mtlora-export check`."""

from __future__ import annotations

import sys

import click

from export.cli.options import (
    backend_option,
    check_keep_fp32,
    from_project_config,
    parse_tasks,
    precision_option,
    say,
    threads_option,
    tolerances_option,
)


@click.command("build")
@click.argument("checkpoint", required=False, type=click.Path())
@precision_option(build=True, help_text=(
    "Engine precision; repeat for several, or 'all'. 'auto' builds fp32, 16-bit, int8 (and int8 with the "
    "fallback), times each here and keeps the fastest that passes every task. With --layout split, parts "
    "may differ: backbone=int8,heads=fp16 (a task name sets that task's head)."))
@backend_option()
@click.option("--layout", type=click.Choice(["single", "split"]), default="single", show_default=True,
              help="One graph, or a shared backbone plus one head per task.")
@click.option("--postprocess", is_flag=True,
              help="Post-process in the graph: class ids (uint8), probabilities, unit normals, instead of raw maps.")
@click.option("--tasks", help="Comma-separated subset of the model's tasks.")
@click.option("--img-size", type=click.IntRange(min=1), help="Input size (default: the model's).")
@click.option("--calib-data", help="INT8 calibration data: synthetic[:split], pascal:ROOT[:split], nyud:ROOT, or an image directory.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--calib-method", type=click.Choice(["percentile", "minmax", "entropy"]), default="percentile", show_default=True)
@click.option("--eval-data", help="Evaluation data (same forms as --calib-data, or an evalset .npz).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--keep-fp32", multiple=True, callback=check_keep_fp32,
              help="Glob over node names or op types to keep in fp32 (repeatable); @FILE reads them from FILE: "
                   "one per line, or the JSON an int8 fallback saves (BUILD/fallback/<engine>.json).")
@click.option("--int8-fallback", type=click.Choice(["on", "always", "off"]), default="on", show_default=True,
              help="When int8 fails a task's gate, keep the fewest layers in fp32 until every task passes. on: "
                   "stop when int8 is no faster than the 16-bit engine here; always: whatever the speed "
                   "(e.g. for another device); off: int8 as calibrated.")
@click.option("--timing-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size of the timings that choose between precisions (auto, the fallback).")
@tolerances_option
@threads_option
@click.option("--max-batch", type=click.IntRange(min=1),
              help="TensorRT: the largest batch the engine takes (its optimisation profile is 1 to this) [default: 8].")
@click.option("--workspace", "workspace_mib", type=click.IntRange(min=1), metavar="MIB",
              help="TensorRT: cap the builder's workspace at MIB mebibytes [default: TensorRT's, the whole device "
                   "memory, which a Jetson shares with the CPU].")
@click.option("--opt-level", "optimization_level", type=click.IntRange(0, 5),
              help="TensorRT: builder optimisation level, 0 (fast build) to 5 (longest search) [default: 3].")
@click.option("--dla", type=click.Choice(["heads"]),
              help="TensorRT, --layout split: build every task head for DLA core 0 with GPU fallback (the backbone "
                   "stays on the GPU); refused on a device without DLA.")
@click.option("--from-bundle", type=click.Path(file_okay=False), help="Build on a device from a bundle (no PyTorch needed).")
@click.option("--out", default="build", show_default=True, type=click.Path(), help="Build directory.")
@click.pass_context
def build(ctx: click.Context, checkpoint, precisions, backends, layout, postprocess, tasks, img_size, calib_data,
          calib_samples, calib_method, eval_data, eval_samples, batch_size, keep_fp32, int8_fallback, timing_batch,
          tolerances, threads, max_batch, workspace_mib, optimization_level, dla, from_bundle, out) -> None:
    """Merge, export, calibrate, build engines and check them against PyTorch, reusing finished steps.

    Without CHECKPOINT: ./mtlora-export.json if present, else the embedded default model.
    Exit code 0 when every accuracy check passes, 1 when any fails.
    """
    from export.checking.report import format_sections, format_table
    from export.pipeline.build import run_build
    from export.pipeline.options import BuildOptions

    project = from_project_config(ctx)
    if from_bundle and ctx.get_parameter_source("checkpoint") == click.core.ParameterSource.DEFAULT_MAP:
        checkpoint = None  # a bundle carries its model; the project's checkpoint is for workstation builds
    if checkpoint and from_bundle:
        raise click.BadParameter("give either CHECKPOINT or --from-bundle, not both", param_hint="--from-bundle")
    if dla and layout != "split":
        raise click.BadParameter("--dla heads puts the task heads on a DLA core; it needs --layout split",
                                 param_hint="--dla")
    if project:
        say(f"using options from {project}")
    options = BuildOptions(checkpoint=checkpoint, precisions=tuple(precisions), backends=tuple(backends),
                           layout=layout, postprocess=postprocess, tasks=parse_tasks(tasks), img_size=img_size,
                           calib_data=calib_data, calib_samples=calib_samples, calib_method=calib_method, eval_data=eval_data,
                           eval_samples=eval_samples, batch_size=batch_size, keep_fp32=tuple(keep_fp32),
                           int8_fallback=int8_fallback, timing_batch=timing_batch, tolerances=tolerances,
                           threads=threads, max_batch=max_batch, workspace_mib=workspace_mib,
                           optimization_level=optimization_level, dla=dla, from_bundle=from_bundle, out=out)
    outcome = run_build(options, say)
    click.echo(format_table(outcome.report))
    sections = format_sections(outcome.report)
    if sections:
        click.echo(f"\n{sections}")
    status = "PASSED" if outcome.passed else "FAILED"
    click.echo(f"\n{status}: reports in {outcome.out}/report.json, junit.xml, summary.md, report.html")
    sys.exit(0 if outcome.passed else 1)


# `check --baseline`: the baseline is of another model, or compares nothing (distinct from a regression).
BASELINE_DOES_NOT_APPLY = 3


@click.command("check")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--baseline", type=click.Path(dir_okay=False), help="A stored report.json; fail on any regression against it.")
@click.option("--allow-other-model", is_flag=True,
              help="Compare with a baseline made from another model (other weights or classes) by task name; "
                   "its settings (post-processing, layout, evaluation data, tolerances) must still match.")
@click.option("--eval-data", help="Evaluation data to use instead of the build's.")
@tolerances_option
@threads_option
def check(build_dir, baseline, eval_data, tolerances, threads, allow_other_model) -> None:
    """Re-run the accuracy checks of BUILD_DIR (and compare with a baseline report: the CI gate).

    Exit code 0 when every check passes (and nothing regressed), 1 when any fails, 3 when the
    baseline does not apply: it was made from another model or with other settings (post-processing,
    layout, evaluation data, tolerances), or it compares nothing.
    """
    from export.checking.baseline import compare_with_baseline, refuse_non_finite
    from export.checking.report import format_table, read_report
    from export.pipeline.check import run_check

    stored = read_report(baseline) if baseline else None
    if stored is not None:
        refuse_non_finite(stored, baseline)  # before the check's work, which it could never judge
    report = run_check(build_dir, say, eval_data=eval_data, tolerances=tolerances, threads=threads)
    click.echo(format_table(report))
    passed = report.passed
    if stored is not None:
        gate = compare_with_baseline(report, stored, allow_other_model=allow_other_model, where=baseline)
        if not gate.applies:
            hint = " (or pass --allow-other-model)" if gate.other_model_only else ""
            click.echo(f"\nBASELINE DOES NOT APPLY: {baseline}: {gate.mismatch}; make a baseline from this model "
                       f"and these settings with 'mtlora-export build' (or 'make baseline'){hint}")
            sys.exit(BASELINE_DOES_NOT_APPLY)
        for line in gate.regressions:
            click.echo(f"REGRESSION {line}")
        passed = passed and gate.passed
        click.echo(f"baseline {baseline}: {gate.compared} task result(s) compared, "
                   + ("no regressions" if gate.passed else f"{len(gate.regressions)} regression(s)"))
    click.echo(f"\n{'PASSED' if passed else 'FAILED'}: reports in {build_dir}")
    sys.exit(0 if passed else 1)
