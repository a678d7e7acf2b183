"""A bad flag is one line too: click's usage, hint and error (four lines) become `Error: ...; see '... --help'`,
exit code 2, for the group's flags, an unknown command, and every kind of bad flag of a command."""

from __future__ import annotations

import pytest

from export.cli import main as export_cli
from mtlora.cli import main as mtlora_cli
from tests.conftest import invoke

CASES = {
    "bad_choice": (export_cli, ["build", "--precision", "fp64"], "'fp64' is not one of", "mtlora-export build"),
    "bad_integer": (export_cli, ["build", "--calib-samples", "many"], "'many' is not a valid integer",
                    "mtlora-export build"),
    "unknown_option": (export_cli, ["build", "--bogus"], "No such option '--bogus'", "mtlora-export build"),
    "missing_argument": (export_cli, ["run"], "Missing argument 'ENGINE'", "mtlora-export run"),
    "missing_value": (export_cli, ["build", "--out"], "'--out' requires an argument", "mtlora-export build"),
    "unknown_command": (export_cli, ["buidl"], "No such command 'buidl'", "mtlora-export"),
    "group_option": (export_cli, ["--bogus"], "No such option '--bogus'", "mtlora-export"),
    "extra_argument": (export_cli, ["check", ".", "."], "unexpected extra argument", "mtlora-export check"),
    "train_range": (mtlora_cli, ["train", "--epochs", "x"], "'x' is not a valid integer", "mtlora train"),
    "train_unknown": (mtlora_cli, ["train", "--bogus"], "No such option '--bogus'", "mtlora train"),
    "mtlora_group": (mtlora_cli, ["--bogus"], "No such option '--bogus'", "mtlora"),
    "mtlora_command": (mtlora_cli, ["trian"], "No such command 'trian'", "mtlora"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_usage_error_is_one_line_naming_the_help(case):
    cli, args, says, command = CASES[case]
    code, output = invoke(cli, *args, prog_name=command.split()[0])
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1, output
    assert lines[0].startswith("Error: ") and says in lines[0], lines[0]
    assert lines[0].endswith(f"; see '{command} --help'"), lines[0]


def test_help_itself_is_untouched():
    code, output = invoke(export_cli, "build", "--help", prog_name="mtlora-export")
    assert code == 0 and output.startswith("Usage: mtlora-export build"), output
