"""`mtlora-export build` and `mtlora-export check`."""

from __future__ import annotations

import sys

import click

from export.cli.options import (
    build_options,
    from_project_config,
    parse_tasks,
    say,
    threads_option,
    tolerances_option,
)


@click.command("build")
@build_options
@click.pass_context
def build(ctx: click.Context, **values) -> None:
    """Merge, export, calibrate, build engines and check them against PyTorch, reusing finished steps.

    Without CHECKPOINT: ./mtlora-export.json if present, else the embedded default model.
    Exit code 0 when every accuracy check passes, 1 when any fails.
    """
    from export.checking.report import format_sections, format_table
    from export.pipeline.build import run_build
    from export.pipeline.options import BuildOptions

    project = from_project_config(ctx)
    checkpoint, from_bundle = values["checkpoint"], values["from_bundle"]
    if from_bundle and ctx.get_parameter_source("checkpoint") == click.core.ParameterSource.DEFAULT_MAP:
        checkpoint = None  # a bundle carries its model; the project's checkpoint is for workstation builds
    if checkpoint and from_bundle:
        raise click.BadParameter("give either CHECKPOINT or --from-bundle, not both", param_hint="--from-bundle")
    if values["dla"] and values["layout"] != "split":
        raise click.BadParameter("--dla heads puts the task heads on a DLA core; it needs --layout split",
                                 param_hint="--dla")
    if project:
        say(f"using options from {project}")
    options = BuildOptions(**{**values, "checkpoint": checkpoint, "tasks": parse_tasks(values["tasks"])})
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
    from export.artifacts.builddir import BuildDir
    from export.artifacts.records import read_build_record
    from export.checking.baseline import compare_with_baseline, refuse_non_finite
    from export.checking.report import format_table, read_report
    from export.pipeline.check import run_check

    # Before the check takes the build's lock: a folder that is not a build (or whose record is damaged)
    # is refused with nothing written into it, not even the lock file.
    read_build_record(BuildDir(build_dir))
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
