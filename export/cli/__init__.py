"""`mtlora-export`: merge, export ONNX, build engines, check them, bundle and benchmark.

Commands are thin; the work lives in library functions. Commands are listed in
`COMMANDS` and imported only when invoked, so `--help` and the torch-free
commands run on a device without PyTorch. `./mtlora-export.json`, when present,
gives `build` its defaults through click's `default_map`.
"""

from __future__ import annotations

import click

from engines.errors import EngineError
from mtlora import __version__
from mtlora.errors import MTLoRAError, OptionError
from mtlora_base.cli import ErrorHandlingGroup, debug_option

# command name -> "module:function"; adding a command means adding a row.
COMMANDS = {
    "build": "export.cli.build:build",
    "check": "export.cli.build:check",
    "merge": "export.cli.convert:merge",
    "onnx": "export.cli.convert:onnx_command",
    "lint": "export.cli.lint:lint",
    "bundle": "export.cli.deploy:bundle",
    "run": "export.cli.deploy:run",
    "bench": "export.cli.bench:bench",
}


class ExportGroup(ErrorHandlingGroup):
    handled = (MTLoRAError, EngineError)
    usage_errors = (OptionError,)
    lazy_commands = COMMANDS


@click.group(cls=ExportGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtlora-export")
@debug_option
@click.pass_context
def main(ctx: click.Context) -> None:
    """Compile MTLoRA multi-task models into verified engines for TensorRT, OpenVINO and ONNX Runtime.

    Typical use: mtlora-export build CKPT --precision fp16
    """
    from export.cli.options import project_default_map

    ctx.default_map = project_default_map(ctx.default_map)
