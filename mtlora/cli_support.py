"""Click plumbing shared by the `mtlora` and `mtlora-export` command lines.

Library errors are our own exception types; at the CLI boundary they become one
line on stderr and exit code 1 (click's usage errors keep exit code 2). A
traceback is shown only with `--debug`.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from mtlora.errors import MTLoRAError


class ErrorHandlingGroup(click.Group):
    """A click group that turns the library's own errors into a one-line message.

    `lazy_commands` is a table of command name -> "module:function" for commands that live in
    other modules: they are imported only when invoked (or listed in --help), so the modules
    never import the group back and a command's heavy imports cost nothing elsewhere.
    """

    handled: tuple[type[BaseException], ...] = (MTLoRAError,)
    lazy_commands: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = self.lazy_commands.get(name)
        if target is None:
            return super().get_command(ctx, name)
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except self.handled as err:
            if ctx.obj and ctx.obj.get("debug") or os.environ.get("MTLORA_DEBUG"):
                raise
            click.echo(f"Error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


def debug_option(func):
    """`--debug`: show tracebacks instead of one-line errors."""

    def callback(ctx: click.Context, _param, value: bool):
        ctx.ensure_object(dict)["debug"] = value
        return value

    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=callback,
                        help="Show full tracebacks for errors.")(func)
