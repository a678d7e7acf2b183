"""Options shared by several commands, defined once, and the project config as click defaults."""

from __future__ import annotations

from dataclasses import MISSING, fields

import click

from engines.precision import PRECISIONS
from export.errors import ExportError
from export.pipeline.options import ALL, AUTO, BACKEND_CHOICES, BuildOptions, plan_of

PRECISION_CHOICES = [*PRECISIONS, ALL]


def say(line: str) -> None:
    """Progress and notices go to stderr, so stdout stays the result."""
    click.echo(line, err=True)




class BuildPrecision(click.ParamType):
    """A precision of the table, 'all', 'auto', or one per part of a split layout (backbone=int8,heads=fp16).

    The one place a `--precision` value is parsed (`export.pipeline.options.plan_of`: a `PrecisionPlan`);
    what it gives the build is the plan's canonical name, which build.json and engine directories record."""

    name = "precision"
    choices = [*PRECISION_CHOICES, AUTO]

    def get_metavar(self, param, ctx=None) -> str:
        return f"[{'|'.join(self.choices)}|backbone=P,heads=P]"

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        if "=" in str(value):
            try:
                return str(plan_of(str(value)))
            except ExportError as err:
                self.fail(str(err), param, ctx)
        self.fail(f"'{value}' is not one of {', '.join(self.choices)}, nor parts like backbone=int8,heads=fp16",
                  param, ctx)


def precision_option(default=("fp16",), help_text="Engine precision; repeat for several, or 'all'."):
    """`--precision` of the table's precisions (`build`'s, with 'auto' and per-part precisions, is its
    `BuildOptions.precisions` field, parsed by `BuildPrecision`)."""
    return click.option("--precision", "precisions", multiple=True, default=default, show_default=True,
                        type=click.Choice(PRECISION_CHOICES), help=help_text)


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


# ----------------------------------------------------------------------------- options from fields

# The command-line parsers a field may name (`export.pipeline.options.Option.parser`): click type, callback.
PARSERS = {
    "precision": dict(type=BuildPrecision()),
    "keep_fp32": dict(callback=check_keep_fp32),
    "tasks": {},  # a comma-separated string, split by `parse_tasks` in the command
}


def _field_default(f):
    return f.default_factory() if f.default is MISSING else f.default


def _field_option(f):
    """The click option (or argument) of one `BuildOptions` field, from its type, default and `Option` metadata."""
    spec = f.metadata["option"]
    default = _field_default(f)
    kinds = {}
    if spec.path is not None:
        kinds["type"] = click.Path(**spec.path)
    elif spec.choices:
        first = () if isinstance(default, tuple) or default is None else (default,)  # a single choice lists its default first
        kinds["type"] = click.Choice([*first, *(c for c in spec.choices if c not in first)])
    elif spec.minimum is not None or spec.maximum is not None:
        kinds["type"] = click.IntRange(min=spec.minimum, max=spec.maximum)
    if spec.parser is not None:
        kinds.update(PARSERS[spec.parser])
    if spec.argument:
        return click.argument(f.name, required=False, **kinds)
    annotation = str(f.type)
    if annotation == "bool":
        kinds["is_flag"] = True
    elif annotation.startswith("tuple") and spec.parser != "tasks":
        kinds["multiple"] = True
    if default not in (None, (), False):
        kinds.update(default=default, show_default=True)
    if spec.metavar:
        kinds["metavar"] = spec.metavar
    return click.option(spec.flag or "--" + f.name.replace("_", "-"), f.name, help=spec.help, **kinds)


def options_from_fields(cls):
    """Decorator: one click parameter per field of the dataclass `cls` that has `option` metadata, in field
    order (`build` is `options_from_fields(BuildOptions)`: adding an option is adding a field)."""
    def add(command):
        for f in reversed(fields(cls)):
            if "option" in f.metadata:
                command = _field_option(f)(command)
        return command
    return add


build_options = options_from_fields(BuildOptions)


def field_option(name: str):
    """The option of one `BuildOptions` field, for another command (`check --tolerances`)."""
    return _field_option(next(f for f in fields(BuildOptions) if f.name == name))


threads_option = field_option("threads")
tolerances_option = field_option("tolerances")
