"""Click plumbing shared by the `mtlora` and `mtlora-export` command lines.

Library errors are our own exception types; at the CLI boundary they become one
line on stderr and exit code 1 (click's usage errors keep exit code 2, in one line
too). Each
command line's group names its library's error types (`handled`, and
`usage_errors` for those that are bad flags), so this module knows none. A
traceback is shown only with `--debug`. SIGTERM (a job scheduler, `docker stop`,
`timeout`) is handled like Ctrl-C: the same clean-up, one line, its own exit
code. The codes are one table, `EXIT_CODES` (docs/reliability.md shows it).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading

import click

from mtlora_base.files import os_error_hint

# Exit codes of both command lines; 128 + the signal's number for an interrupted command, as shells report it.
EXIT_CODES = {
    "ok": 0,
    "failure": 1,  # our error (one line), or a failed accuracy check / gate regression
    "usage": 2,  # a bad or conflicting flag (click's usage error)
    "baseline does not apply": 3,  # `check --baseline` with a baseline of another model or other settings
    "interrupted (SIGINT)": 128 + signal.SIGINT,  # 130
    "interrupted (SIGTERM)": 128 + signal.SIGTERM,  # 143
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every clean-up written for Ctrl-C runs for it too."""


def _raise_terminated(_signum, _frame) -> None:
    # A second SIGTERM must not cut the clean-up of the first short; SIGKILL still ends the process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While a command runs, SIGTERM raises `Terminated` (a KeyboardInterrupt); the old handler comes back
    after. Only the main thread can install signal handlers (click's test runner may use another)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ErrorHandlingGroup(click.Group):
    """A click group that turns the library's own errors into a one-line message.

    `lazy_commands` is a table of command name -> "module:function" for commands that live in
    other modules: they are imported only when invoked (or listed in --help), so the modules
    never import the group back and a command's heavy imports cost nothing elsewhere.
    """

    handled: tuple[type[BaseException], ...] = ()  # the library's own errors: one line, exit 1
    usage_errors: tuple[type[BaseException], ...] = ()  # those of them that are bad flags: exit 2
    lazy_commands: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = self.lazy_commands.get(name)
        if target is None:
            return super().get_command(ctx, name)
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.UsageError as err:  # the group's own flags
            _usage_error(err)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.obj and ctx.obj.get("debug") or os.environ.get("MTLORA_DEBUG"))
        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except click.exceptions.UsageError as err:  # a subcommand's flags, or no such subcommand
            # Some errors (an option without its value) come without their context: name the subcommand's.
            command = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
            _usage_error(err, command)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # explicit exits are click's to report
        except self.handled as err:
            if debug:
                raise
            click.echo(f"Error: {_one_line(err)}", err=True)
            sys.exit(EXIT_CODES["usage" if isinstance(err, self.usage_errors) else "failure"])
        except KeyboardInterrupt as err:
            which = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
            click.echo(f"Interrupted ({which}).", err=True)
            sys.exit(EXIT_CODES[f"interrupted ({which})"])
        except Exception as err:  # noqa: BLE001 - the promise: one line, never a traceback
            if debug:
                raise
            click.echo(f"Error: {describe_unexpected(err)}", err=True)
            sys.exit(EXIT_CODES["failure"])


def _usage_error(err: click.exceptions.UsageError, command: str | None = None):
    """click prints usage, a hint and the error on four lines; ours is one, naming where help is (exit 2)."""
    command = err.ctx.command_path if err.ctx is not None else command
    where = f"; see '{command} --help'" if command else ""
    click.echo(f"Error: {_one_line_text(err.format_message()).rstrip('.')}{where}", err=True)
    sys.exit(err.exit_code)


def _one_line(err: BaseException) -> str:
    """The error and what was added on its way up (`add_note`: e.g. what a failed run kept), as one line."""
    return _one_line_text("; ".join([str(err), *getattr(err, "__notes__", ())])) or type(err).__name__


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


def describe_unexpected(err: BaseException) -> str:
    """One line for an error no library code turned into ours: what the system said, or an internal error."""
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or _one_line(err)}; {os_error_hint(err)}"
    if isinstance(err, MemoryError):
        return "out of memory; use a smaller batch, input size or model, or a machine with more memory"
    return (f"internal error ({type(err).__name__}: {_one_line(err)[:300]}); re-run with --debug for the "
            "traceback and report it")


def debug_option(func):
    """`--debug`: show tracebacks instead of one-line errors."""

    def callback(ctx: click.Context, _param, value: bool):
        ctx.ensure_object(dict)["debug"] = value
        return value

    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=callback,
                        help="Show full tracebacks for errors.")(func)
