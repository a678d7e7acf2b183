"""Options shared by several commands, defined once, and the project config as click defaults."""

from __future__ import annotations

import click

from engines.registry import BACKENDS, PRECISIONS
from export.errors import ExportError

PRECISION_CHOICES = [*PRECISIONS, "all"]
BACKEND_CHOICES = ["auto", "all", *BACKENDS]


def say(line: str) -> None:
    """Progress and notices go to stderr, so stdout stays the result."""
    click.echo(line, err=True)


threads_option = click.option("--threads", type=click.IntRange(min=1),
                              help="CPU threads per engine [default: the runtime's own choice].")
tolerances_option = click.option("--tolerances", type=click.Path(dir_okay=False),
                                 help="JSON file of per-precision, per-task limits (see export/checking/tolerances.py).")


class BuildPrecision(click.ParamType):
    """A backend precision, 'all', 'auto', or one per part of a split layout (backbone=int8,heads=fp16)."""

    name = "precision"
    choices = [*PRECISION_CHOICES, "auto"]

    def get_metavar(self, param, ctx=None) -> str:
        return f"[{'|'.join(self.choices)}|backbone=P,heads=P]"

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        if "=" in str(value):
            from export.pipeline.options import normalize_precision

            try:
                return normalize_precision(str(value))
            except ExportError as err:
                self.fail(str(err), param, ctx)
        self.fail(f"'{value}' is not one of {', '.join(self.choices)}, nor parts like backbone=int8,heads=fp16",
                  param, ctx)


def precision_option(default=("fp16",), help_text="Engine precision; repeat for several, or 'all'.",
                     build: bool = False):
    """`--precision`; with `build`, also 'auto' and per-part precisions (`BuildPrecision`)."""
    kind = BuildPrecision() if build else click.Choice(PRECISION_CHOICES)
    return click.option("--precision", "precisions", multiple=True, default=default, show_default=True,
                        type=kind, help=help_text)


def check_keep_fp32(ctx: click.Context, param: click.Parameter, values):
    """--keep-fp32: an @FILE that cannot be read is a bad flag (one line, exit 2)."""
    from export.pipeline.options import read_keep_fp32

    try:
        read_keep_fp32(values)
    except ExportError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return values


def backend_option(default=("auto",), choices=BACKEND_CHOICES,
                   help_text="auto = TensorRT if usable, else OpenVINO, else ONNX Runtime; repeat for several, or 'all'."):
    return click.option("--backend", "backends", multiple=True, default=default, show_default=True,
                        type=click.Choice(choices), help=help_text)


def parse_tasks(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    tasks = tuple(t.strip() for t in value.split(","))
    if not all(tasks):
        raise click.BadParameter(f"'{value}' has an empty task name; give a comma-separated list like semseg,sal",
                                 param_hint="--tasks")
    return tasks


# Project-config keys as users write them -> the `build` parameter they set.
CONFIG_ALIASES = {"precision": "precisions", "backend": "backends"}


def project_default_map(existing: dict | None) -> dict | None:
    """`./mtlora-export.json` as `build`'s defaults (an explicit flag always wins over it)."""
    from export.pipeline.options import BuildOptions
    from export.pipeline.sources import read_project_config

    found = read_project_config()
    if found is None:
        return existing
    path, data = found
    defaults = {}
    known = BuildOptions.names()
    for raw_key, value in data.items():
        key = CONFIG_ALIASES.get(raw_key, raw_key)
        if key not in known or key in ("from_bundle", "report_samples", "keep_fp32_roles"):
            raise ExportError(f"{path}: unknown option '{raw_key}'; use build's option names, e.g. "
                              "checkpoint, precision, backend, eval_data")
        if key == "checkpoint":
            value = str(path.parent / value)
        elif key == "tasks" and isinstance(value, list):
            value = ",".join(value)
        defaults[key] = value
    merged = dict(existing or {})
    merged["build"] = {**defaults, "_project_config": str(path), **merged.get("build", {})}
    return merged


def from_project_config(ctx: click.Context) -> str | None:
    """The project config file when any of this command's values came from it."""
    path = (ctx.default_map or {}).get("_project_config")
    if path and any(ctx.get_parameter_source(p.name) == click.core.ParameterSource.DEFAULT_MAP
                    for p in ctx.command.params):
        return path
    return None
