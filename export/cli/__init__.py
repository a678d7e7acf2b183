"""`mtlora-export`: merge, export ONNX, build engines, check them, bundle and benchmark.

Commands are thin; the work lives in library functions. Heavy imports (torch,
backend SDKs) happen inside the commands, so the torch-free commands run on a
device without PyTorch.
"""

from __future__ import annotations

import click

from engines.errors import EngineError
from mtlora import __version__
from mtlora.cli_support import ErrorHandlingGroup, debug_option
from mtlora.errors import MTLoRAError


class ExportGroup(ErrorHandlingGroup):
    handled = (MTLoRAError, EngineError)


@click.group(cls=ExportGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtlora-export")
@debug_option
def main() -> None:
    """Compile MTLoRA multi-task models into verified engines for TensorRT, OpenVINO and ONNX Runtime.

    Typical use: mtlora-export build CKPT --precision fp16
    """


def _register() -> None:
    # Each module adds its commands to `main`; importing them is cheap (no torch at import time).
    import importlib

    for name in ("export.cli.convert", "export.cli.build", "export.cli.deploy", "export.cli.bench"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise


_register()
