"""`mtlora`: the model and training side (info, import-upstream, predict, train, evaluate).

One module per command (`mtlora.cli.<command>`), imported only when the command is invoked or listed;
`options` holds the model options and presets that `train` and `info` share.
"""

from __future__ import annotations

import click

from mtlora import __version__
from mtlora.errors import MTLoRAError, OptionError
from mtlora_base.cli import ErrorHandlingGroup, debug_option

# command name -> "module:function"; adding a command means adding a row.
COMMANDS = {
    "info": "mtlora.cli.info:info",
    "import-upstream": "mtlora.cli.import_upstream:import_upstream_cmd",
    "predict": "mtlora.cli.predict:predict",
    "train": "mtlora.cli.train:train_cmd",
    "evaluate": "mtlora.cli.evaluate:evaluate_cmd",
}


class MTLoRAGroup(ErrorHandlingGroup):
    handled = (MTLoRAError,)
    usage_errors = (OptionError,)
    lazy_commands = COMMANDS


@click.group(cls=MTLoRAGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtlora")
@debug_option
def main() -> None:
    """Multi-task Swin Transformers with MTLoRA adapters: inspect, import, train, evaluate, predict."""
