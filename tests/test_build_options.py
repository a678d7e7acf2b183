"""`build`'s options are made from the fields of `BuildOptions`: adding an option is adding a field, and the
choices are the tables'."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import click
from click.testing import CliRunner

from calibration.methods import CALIBRATION_METHODS
from export.cli.build import build
from export.cli.options import options_from_fields
from export.pipeline.options import BACKEND_CHOICES, FALLBACK_MODES, LAYOUTS, BuildOptions, option


def test_every_field_with_an_option_is_a_build_parameter_in_field_order():
    names = [f.name for f in fields(BuildOptions) if "option" in f.metadata]
    # and then the gate's two, which judge the build and are not recorded with it
    assert [p.name for p in build.params] == [*names, "baseline", "allow_other_model"]
    assert {"keep_fp32_roles", "report_samples"}.isdisjoint(names)  # recorded, never typed


def test_choices_come_from_the_tables():
    params = {p.name: p for p in build.params}
    assert set(params["layout"].type.choices) == set(LAYOUTS)
    assert set(params["calib_method"].type.choices) == set(CALIBRATION_METHODS)
    assert set(params["int8_fallback"].type.choices) == set(FALLBACK_MODES)
    assert tuple(params["backends"].type.choices) == BACKEND_CHOICES
    # A single choice is listed with its default first.
    assert params["calib_method"].type.choices[0] == "percentile" == params["calib_method"].default


def test_a_new_option_is_one_field():
    @dataclass
    class WithOneMore(BuildOptions):
        warm_runs: int = field(default=3, metadata=option("Untimed runs before timing.", minimum=1))

    @click.command()
    @options_from_fields(WithOneMore)
    def command(**values):
        click.echo(f"warm_runs={values['warm_runs']} layout={values['layout']}")

    runner = CliRunner()
    result = runner.invoke(command, ["--warm-runs", "5", "--layout", "split"])
    assert result.exit_code == 0 and result.output.strip() == "warm_runs=5 layout=split", result.output
    assert "warm_runs=3" in runner.invoke(command, []).output
    help_text = runner.invoke(command, ["--help"]).output
    assert "--warm-runs INTEGER RANGE" in help_text and "Untimed runs before timing." in help_text
    assert "[default: 3; x>=1]" in " ".join(help_text.split())
    bad = runner.invoke(command, ["--warm-runs", "0"])
    assert bad.exit_code == 2 and "0 is not in the range x>=1" in bad.output
