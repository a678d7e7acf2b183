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

# `--baseline`: the baseline is of another model, or compares nothing (distinct from a regression).
BASELINE_DOES_NOT_APPLY = 3

baseline_option = click.option("--baseline", type=click.Path(dir_okay=False),
                               help="A stored report.json; fail on any regression against it.")
allow_other_model_option = click.option(
    "--allow-other-model", is_flag=True,
    help="Compare with a baseline made from another model (other weights or classes) by task name; "
         "its settings (post-processing, layout, evaluation data, tolerances) must still match.")


def read_baseline(baseline: str | None):
    """The stored report of `--baseline`, refused in one line before any work when it cannot judge anything."""
    from export.checking.baseline import refuse_non_finite
    from export.checking.report import read_report

    if not baseline:
        return None
    stored = read_report(baseline)
    refuse_non_finite(stored, baseline)
    return stored


def judge_against(report, stored, baseline: str, allow_other_model: bool) -> bool:
    """Print the comparison of `report` with the baseline; whether nothing regressed (exit 3 when the
    baseline does not apply)."""
    from export.checking.baseline import compare_with_baseline

    gate = compare_with_baseline(report, stored, allow_other_model=allow_other_model, where=baseline)
    if not gate.applies:
        hint = " (or pass --allow-other-model)" if gate.other_model_only else ""
        click.echo(f"\nBASELINE DOES NOT APPLY: {baseline}: {gate.mismatch}; make a baseline from this model "
                   f"and these settings with 'mtlora-export build' (or 'make baseline'){hint}")
        sys.exit(BASELINE_DOES_NOT_APPLY)
    for line in gate.regressions:
        click.echo(f"REGRESSION {line}")
    click.echo(f"baseline {baseline}: {gate.compared} task result(s) compared, "
               + ("no regressions" if gate.passed else f"{len(gate.regressions)} regression(s)"))
    return gate.passed


@click.command("build")
@build_options
@baseline_option
@allow_other_model_option
@click.pass_context
def build(ctx: click.Context, baseline: str | None, allow_other_model: bool, **values) -> None:
    """Merge, export, calibrate, build engines and check them against PyTorch, reusing finished steps.

    Without CHECKPOINT: ./mtlora-export.json if present, else the embedded default model.
    Exit code 0 when every accuracy check passes (and, with --baseline, nothing regressed), 1 when any
    fails, 3 when the baseline does not apply (see `check`). With --baseline a build is the CI gate in
    one command: its checks are not run twice.
    """
    from export.checking.report import format_sections, format_table
    from export.pipeline.build import run_build
    from export.pipeline.options import BuildOptions

    stored = read_baseline(baseline)  # a baseline that cannot judge anything is refused before hours of work
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
    passed = outcome.passed
    if stored is not None:
        passed = judge_against(outcome.report, stored, baseline, allow_other_model) and passed
    status = "PASSED" if passed else "FAILED"
    click.echo(f"\n{status}: reports in {outcome.out}/report.json, junit.xml, summary.md, report.html")
    sys.exit(0 if passed else 1)


@click.command("check")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@baseline_option
@allow_other_model_option
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
    from export.checking.report import format_table
    from export.pipeline.check import run_check

    # Before the check takes the build's lock: a folder that is not a build (or whose record is damaged)
    # is refused with nothing written into it, not even the lock file.
    read_build_record(BuildDir(build_dir))
    stored = read_baseline(baseline)  # before the check's work, which it could never judge
    report = run_check(build_dir, say, eval_data=eval_data, tolerances=tolerances, threads=threads)
    click.echo(format_table(report))
    passed = report.passed
    if stored is not None:
        passed = judge_against(report, stored, baseline, allow_other_model) and passed
    click.echo(f"\n{'PASSED' if passed else 'FAILED'}: reports in {build_dir}")
    sys.exit(0 if passed else 1)
