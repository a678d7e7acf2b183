"""What a build is asked to do, checked once before any work: options, backends, precisions.

Precisions are rows of the precision table (`engines.precision`), and a `--precision` value is a
`PrecisionPlan`, parsed by the command line (`export.cli.options.BuildPrecision`) into its canonical name;
`BuildOptions.plans()` and `plan_of` give the plan back. What each backend builds comes from the backend
table (`engines.registry`); `engine_plan` is the one place a plan is checked against it. Every later step
takes the resolved (backend, precision) pairs as given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

from calibration.methods import CALIBRATION_METHODS
from engines.precision import PARTS, PRECISIONS, PrecisionError, PrecisionPlan
from engines.registry import BACKENDS, choose_backend
from export.errors import ExportError, ExportOptionError

Say = Callable[[str], None]

# What `--precision all` builds: the table's rows marked `in_all` (bf16 only when asked for by name).
ALL_PRECISIONS = tuple(p.name for p in PRECISIONS.values() if p.in_all)
ALL = "all"  # `--precision all`, `--backend all`
# `--precision auto`: build every candidate, time each here, keep the fastest that passes (pipeline.auto).
AUTO = "auto"
LAYOUTS = ("single", "split")
# `--int8-fallback` (int8 and 16-bit alike; the name is kept for the build records and configs that use it):
# on = keep the fewest layers in fp32 until every task passes, stopping when the engine is no faster than
# the tighter format it must beat (int8: 16-bit; bf16: fp16, fp32; fp16: fp32), and then taking that
# format; always = whatever the speed; off = build as asked.
FALLBACK_MODES = ("on", "always", "off")
# `--keep-fp32 @FILE` reads the globs from FILE (see `read_keep_fp32`).
KEEP_FILE_PREFIX = "@"
KEEP_FILE_FORMAT = "mtlora-export/keep-fp32/1"
# `--threads`: far more than one engine can use. The runtimes take more without a word, and then crash
# (ONNX Runtime at 100000) or spend minutes starting threads; 2^31 does not even fit their C int.
MAX_THREADS = 1024


@dataclass(frozen=True)
class Option:
    """How a `BuildOptions` field is asked for on the command line (`export.cli.options.options_from_fields`
    makes the click option from it; the default is the field's).

    help: the help text; choices: the table the value comes from (listed default first); minimum and
    maximum: an integer's range; metavar: the value's name in the help; path: click.Path's arguments
    (file_okay / dir_okay) for a path; flag: the flag when it is not `--<field-name>`; parser: a command-line parser the CLI names ("precision", "keep_fp32");
    argument: a positional argument (optional) instead of an option.
    """

    help: str | None = None
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    path: Mapping[str, bool] | None = None
    flag: str | None = None
    parser: str | None = None
    argument: bool = False
    maximum: int | None = None
    metavar: str | None = None


def option(help: str | None = None, **how) -> dict:
    """Field metadata: the field is a command-line option of `build` (see `Option`)."""
    return {"option": Option(help, **how)}


# `--dla`: what may run on a DLA core (TensorRT, split layout).
DLA_TARGETS = ("heads",)

# `--backend`: a backend of the table, 'auto' (the best usable here) or 'all'.
BACKEND_CHOICES = ("auto", "all", *BACKENDS)


@dataclass
class BuildOptions:
    """What a build is asked to do. The fields with `option` metadata are the `build` command's options,
    in this order; adding one is adding a field."""

    checkpoint: str | None = field(default=None, metadata=option(argument=True, path={}))
    precisions: tuple[str, ...] = field(default=("fp16",), metadata=option(
        "Engine precision; repeat for several, or 'all'. 'auto' builds fp32, 16-bit, int8 (and int8 with the "
        "fallback), times each here and keeps the fastest that passes every task. With --layout split, parts "
        "may differ: backbone=int8,heads=fp16 (a task name sets that task's head).",
        flag="--precision", parser="precision"))
    backends: tuple[str, ...] = field(default=("auto",), metadata=option(
        "auto = TensorRT if usable, else OpenVINO, else ONNX Runtime; repeat for several, or 'all'.",
        flag="--backend", choices=BACKEND_CHOICES))
    layout: str = field(default="single", metadata=option(
        "One graph, or a shared backbone plus one head per task.", choices=LAYOUTS))
    postprocess: bool = field(default=False, metadata=option(
        "Post-process in the graph: class ids (uint8), probabilities, unit normals, instead of raw maps."))
    tasks: tuple[str, ...] | None = field(default=None, metadata=option(
        "Comma-separated subset of the model's tasks.", parser="tasks"))
    img_size: int | None = field(default=None, metadata=option("Input size (default: the model's).", minimum=1))
    calib_data: str | None = field(default=None, metadata=option(
        "INT8 calibration data: synthetic[:split], pascal:ROOT[:split], nyud:ROOT, or an image directory."))
    calib_samples: int = field(default=256, metadata=option(minimum=1))
    calib_method: str = field(default="percentile", metadata=option(choices=CALIBRATION_METHODS))
    eval_data: str | None = field(default=None, metadata=option(
        "Evaluation data (same forms as --calib-data, or an evalset .npz)."))
    eval_samples: int = field(default=32, metadata=option(minimum=1))
    batch_size: int = field(default=4, metadata=option(minimum=1))
    keep_fp32: tuple[str, ...] = field(default=(), metadata=option(
        "Glob over node names or op types to keep in fp32 (repeatable); @FILE reads them from FILE: "
        "one per line, or the JSON an int8 fallback saves (BUILD/fallback/<engine>.json).", parser="keep_fp32"))
    # Globs for one graph role only ("model", "backbone", "head_<task>"), from a --keep-fp32 @FILE.json.
    keep_fp32_roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    int8_fallback: str = field(default="on", metadata=option(
        "When an int8, fp16 or bf16 engine fails a task's gate, keep the fewest layers in fp32 until every "
        "task passes. on: stop when it is no faster here than the next format that passes (int8: 16-bit; "
        "16-bit: fp32), and build that instead; always: whatever the speed (e.g. for another device); "
        "off: as asked.", choices=FALLBACK_MODES))
    timing_batch: int = field(default=1, metadata=option(
        "Batch size of the timings that choose between precisions (auto, the fallback).", minimum=1))
    tolerances: str | None = field(default=None, metadata=option(
        "JSON file of per-precision, per-task limits (see export/checking/tolerances.py).", path={"dir_okay": False}))
    threads: int | None = field(default=None, metadata=option(
        "CPU threads per engine [default: the runtime's own choice].", minimum=1, maximum=MAX_THREADS))
    max_batch: int | None = field(default=None, metadata=option(
        "TensorRT: the largest batch the engine takes (its optimisation profile is 1 to this) [default: 8].",
        minimum=1))
    workspace_mib: int | None = field(default=None, metadata=option(
        "TensorRT: cap the builder's workspace at MIB mebibytes [default: TensorRT's, the whole device "
        "memory, which a Jetson shares with the CPU].", flag="--workspace", minimum=1, metavar="MIB"))
    optimization_level: int | None = field(default=None, metadata=option(
        "TensorRT: builder optimisation level, 0 (fast build) to 5 (longest search) [default: 3].",
        flag="--opt-level", minimum=0, maximum=5))
    dla: str | None = field(default=None, metadata=option(
        "TensorRT, --layout split: build every task head for DLA core 0 with GPU fallback (the backbone "
        "stays on the GPU); refused on a device without DLA.", choices=DLA_TARGETS))
    from_bundle: str | None = field(default=None, metadata=option(
        "Build on a device from a bundle (no PyTorch needed).", path={"file_okay": False}))
    report_samples: int = 3
    out: str = field(default="build", metadata=option("Build directory.", path={}))

    def plans(self) -> tuple[PrecisionPlan, ...]:
        """The precision plans asked for ('all' expanded; `auto`, which builds candidates, is not a plan)."""
        return tuple(plan_of(p) for p in resolve_precisions(self.precisions) if p != AUTO)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_record(cls, options: dict, where: str) -> BuildOptions:
        """Options as build.json recorded them (lists back to tuples)."""
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
        except TypeError as err:
            raise ExportError(f"{where}: not a build record of this version ({err})") from None


def resolve_precisions(requested: tuple[str, ...]) -> tuple[str, ...]:
    """The precisions asked for, 'all' standing for the table's `in_all` rows (a precision named beside it,
    such as bf16, is kept), each by its plan's canonical name."""
    expanded = (p for r in requested for p in (ALL_PRECISIONS if r == ALL else (normalize_precision(r),)))
    return tuple(dict.fromkeys(expanded))


# ----------------------------------------------------------------------------- the precision plan
#
# A `--precision` value is parsed into a `PrecisionPlan` once, where it enters (the command line); the
# canonical name it gives is what `BuildOptions.precisions`, build.json and engine directories record.
# `plan_of` gives the plan of such a name back (parsed once per name, then remembered); the string
# helpers below are that plan asked one question, for callers that still hold names.


@lru_cache(maxsize=256)
def plan_of(precision: str) -> PrecisionPlan:
    """The plan of a precision name or per-part precision, its part names checked against the known tasks
    (not yet against a backend: `engine_plan` does that, nor against the model: the build does)."""
    from mtlora.tasks import TASKS

    try:
        return PrecisionPlan.parse(precision, tasks=TASKS)
    except PrecisionError as err:
        raise ExportError(str(err)) from None


def is_part_precision(precision: str) -> bool:
    return "=" in precision


def parse_part_precision(text: str) -> dict[str, str]:
    """`backbone=int8,heads=fp16` -> {"backbone": "int8", "heads": "fp16"} (as given, before a plan that
    gives every part one precision becomes that precision)."""
    plan = plan_of(text)
    if not plan.per_part:  # backbone=X,heads=X
        return dict.fromkeys(PARTS, plan.whole.name)
    return {part: p.name for part, p in plan.parts}


def normalize_precision(precision: str) -> str:
    """A precision as the pipeline names it: per-part ones in canonical order, and one that gives every
    part the same precision as that precision."""
    return str(plan_of(precision)) if is_part_precision(precision) else precision


def precisions_used(precision: str) -> set[str]:
    """Every backend precision an engine set of `precision` builds."""
    return {p.name for p in plan_of(precision).used}


def role_precisions(precision: str, roles: Iterable[str]) -> dict[str, str]:
    """Each graph role's precision ("model", "backbone", "head_<task>")."""
    try:
        return {role: p.name for role, p in plan_of(precision).for_roles(roles).items()}
    except PrecisionError as err:
        raise ExportOptionError(str(err)) from None


def task_precisions(precision: str, tasks: Iterable[str]) -> dict[str, str]:
    """The precision each task is judged at: the loosest of the parts it runs through."""
    plan = plan_of(precision)
    return {t: plan.for_task(t).name for t in tasks}


# ----------------------------------------------------------------------------- --keep-fp32 @FILE


def read_keep_fp32(entries: Iterable[str]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """`--keep-fp32` values with every `@FILE` read: (globs for every graph, {graph role: globs}).

    FILE is a text file (one glob per line; blank lines and `#` comments skipped) or JSON: a list of
    globs, or an object whose "keep_fp32" is such a list or, per graph role, {"model": [...]} (what a
    fallback search writes to BUILD/fallback/<engine>.json). A missing or malformed file is one error.
    """
    from export.artifacts.files import read_json

    globs: list[str] = []
    roles: dict[str, list[str]] = {}
    for entry in entries:
        if not entry.startswith(KEEP_FILE_PREFIX):
            globs.append(entry)
            continue
        path = Path(entry[len(KEEP_FILE_PREFIX):])
        where = f"--keep-fp32 {entry}"
        if not path.is_file():
            raise ExportError(f"{where}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
        if path.suffix.lower() == ".json":
            data = read_json(path, corrupt=f"{where}: not valid JSON", missing=f"{where}: no such file")
            if isinstance(data, dict) and "keep_fp32" in data:
                data = data["keep_fp32"]
            if isinstance(data, dict):
                for role, names in data.items():
                    roles.setdefault(str(role), []).extend(_globs(names, f"{where}: keep_fp32.{role}"))
            else:
                globs.extend(_globs(data, where))
        else:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise ExportError(f"{where}: cannot read it ({type(err).__name__})") from None
            globs.extend(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return tuple(dict.fromkeys(globs)), {r: tuple(dict.fromkeys(g)) for r, g in roles.items()}


def _globs(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ExportError(f"{where}: expected a list of node names or globs, e.g. "
                          + json.dumps({"keep_fp32": ["/blocks.0/mlp/fc2/MatMul"]}))
    return value


def expand_keep_fp32(opts: BuildOptions) -> BuildOptions:
    """`opts` with every --keep-fp32 @FILE read (build.json then records the globs themselves)."""
    if not any(e.startswith(KEEP_FILE_PREFIX) for e in opts.keep_fp32):
        return opts
    globs, roles = read_keep_fp32(opts.keep_fp32)
    merged = {r: tuple(dict.fromkeys([*opts.keep_fp32_roles.get(r, ()), *g])) for r, g in roles.items()}
    return replace(opts, keep_fp32=globs, keep_fp32_roles={**opts.keep_fp32_roles, **merged})


def resolve_backends(requested: tuple[str, ...], say: Say) -> list[str]:
    """'auto' and 'all' resolved against what is usable here, each choice said in one line."""
    chosen = []
    for name in requested:
        if name == "all":
            for candidate, spec in BACKENDS.items():
                ok, reason = spec.available()
                if ok:
                    chosen.append(candidate)
                else:
                    say(f"skipping {candidate}: {reason}")
            continue
        resolved, notice = choose_backend(name)
        say(notice)
        chosen.append(resolved)
    return list(dict.fromkeys(chosen))


def engine_plan(opts: BuildOptions, say: Say) -> list[tuple[str, str]]:
    """The (backend, precision) pairs to build, each checked against the backend table.

    A precision is a backend precision, `auto` (alone: `pipeline.auto` builds the candidates), or a
    per-part one such as `backbone=int8,heads=fp16` (split layout), each part checked on its own."""
    precisions = resolve_precisions(opts.precisions)
    if AUTO in precisions and len(precisions) > 1:
        raise ExportOptionError("--precision auto builds and compares every precision itself; give it alone")
    parted = [p for p in precisions if is_part_precision(p)]
    if parted and opts.layout != "split" and not opts.from_bundle:  # a bundle has its own layout
        raise ExportOptionError(f"precision '{parted[0]}' gives the backbone and heads their own precision; "
                          "it needs --layout split")
    if opts.int8_fallback not in FALLBACK_MODES:
        raise ExportOptionError(f"unknown fallback mode '{opts.int8_fallback}'; choose one of {', '.join(FALLBACK_MODES)}")
    if opts.timing_batch < 1:
        raise ExportOptionError(f"the timing batch must be at least 1, got {opts.timing_batch}")
    backends = resolve_backends(opts.backends, say)

    def builds(backend: str, precision: str) -> bool:
        return precision == AUTO or all(backend in used.backends for used in plan_of(precision).used)

    for precision in precisions:
        if not any(builds(b, precision) for b in backends):  # the first backend's error says what it builds
            for used in sorted(precisions_used(precision)):
                BACKENDS[backends[0]].check_precision(used)
    pairs = []
    for backend in backends:
        for precision in precisions:
            if builds(backend, precision):
                pairs.append((backend, precision))
            else:  # several backends asked for: each builds what it can (bf16 is OpenVINO's alone)
                say(f"skipping {backend}-{precision}: {backend} does not build {precision} "
                    f"({', '.join(BACKENDS[backend].precisions)})")
    return pairs
