"""The precision table, and the precision plan of one engine set (which precision each graph is built in).

A precision is a row of `PRECISIONS` that carries what the rest of the code used to work out from its
name: its bits and number family, whether it needs calibration data, how loose its accuracy limits are
(`looseness`, and the `levels` the task kinds turn into limits), what an engine asked for it may really
execute as (`runs_as`), and which backends build it (`engines.registry.BACKENDS` reads its rows from
here). Adding a precision (fp8, say) is one row here plus the backend code that builds it.

On disk a precision stays its name (sidecars, reports, engine directories such as `openvino-fp16`); in
memory it is a `Precision`, and a `--precision` value is a `PrecisionPlan`, parsed once where it enters
(the command line) and asked by role or task below.

Torch-free, and imports nothing of ours but `engines.errors`, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from engines.errors import EngineError

Levels = Mapping[str, float | None]


class PrecisionError(EngineError, ValueError):
    """A precision name or per-part precision that cannot be read; its message is the one line a user sees."""


@dataclass(frozen=True)
class Precision:
    """One row of the precision table.

    name: as written on disk and on the command line; bits, family ("float" or "int"): the number format;
    calibrated: it needs calibration data (a Q/DQ graph or NNCF); source: the export's own precision (its
    graph is the exported ONNX itself); looseness: rank of its accuracy limits, tightest 0 (a task is judged
    at the loosest precision on its path); runs_as: what an engine asked for it may really execute as, its
    own name first (16-bit speed on a CPU that has bf16 and no fp16 kernels, an int8 graph's float
    remainder); backends: the backends that build it; in_all: part of `--precision all`; must_beat: what a mix
    at this precision must be faster than (the fallback's speed rule); levels: its default
    accuracy levels, which each task kind turns into limits (`mtlora.tasks.TaskKind.default_limits`).
    """

    name: str
    bits: int
    family: str
    calibrated: bool
    looseness: int
    runs_as: tuple[str, ...]
    backends: tuple[str, ...]
    in_all: bool = True
    source: bool = False
    # The formats a mix at this precision (some layers kept in fp32) has to be faster than to be worth it,
    # nearest first: the formats a build takes instead when no mix pays off (`export.pipeline.fallback`).
    must_beat: tuple[str, ...] = ()
    levels: Levels = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __str__(self) -> str:
        return self.name

    @property
    def sixteen_bit(self) -> bool:
        """A 16-bit float (fp16, bf16): what an int8 engine has to beat for speed."""
        return self.family == "float" and self.bits == 16

    def may_run_as(self, executed: str) -> bool:
        """Whether an engine asked for this precision may honestly report `executed` as what ran."""
        return executed in self.runs_as

    def looser(self, other: Precision) -> Precision:
        """The looser of two precisions (this one on a tie)."""
        return other if other.looseness > self.looseness else self


def _levels(**levels: float | None) -> Levels:
    return MappingProxyType(levels)


# Tightest first. The levels: max_abs and cosine for tensors, agreement for pixels that keep their class or
# side, angle for normals (degrees), drop for the primary metric against labels, ids the floor for
# post-processed class ids (no tensor to compare).
_ROWS = (
    # fp32 is judged on the tensors; class ids (post-processed) may differ only where two classes tie.
    Precision("fp32", 32, "float", calibrated=False, looseness=0, runs_as=("fp32",),
              backends=("tensorrt", "openvino", "onnxruntime"), source=True,
              levels=_levels(max_abs=1e-3, cosine=0.99999, agreement=None, angle=None, drop=None, ids=0.9999)),
    # fp16 asks for 16-bit speed: OpenVINO runs the fastest of f32/bf16/f16 here, ONNX Runtime's CPU provider
    # runs fp32 kernels between casts, TensorRT may choose no fp16 layer.
    Precision("fp16", 16, "float", calibrated=False, looseness=1, runs_as=("fp16", "bf16", "fp32"),
              backends=("tensorrt", "openvino", "onnxruntime"), must_beat=("fp32",),
              levels=_levels(max_abs=None, cosine=0.999, agreement=0.99, angle=0.5, drop=0.5, ids=0.99)),
    # bf16 only when named: few devices run it natively (f32 where the device lacks it).
    Precision("bf16", 16, "float", calibrated=False, looseness=2, runs_as=("bf16", "fp32"),
              backends=("openvino",), in_all=False, must_beat=("fp16", "fp32"),
              levels=_levels(max_abs=None, cosine=0.99, agreement=0.97, angle=1.5, drop=0.5, ids=0.97)),
    # INT8 is judged by the task metrics against labels (mIoU / odsF drop <= 1 point, normals error <= 0.5
    # degrees worse); the cosine, angle and class-id floors only catch an engine that is broken outright, and
    # are what remains when the evaluation set has no labels. Its float remainder runs in any float format.
    Precision("int8", 8, "int", calibrated=True, looseness=3, runs_as=("int8", "fp16", "bf16", "fp32"),
              backends=("tensorrt", "openvino", "onnxruntime"), must_beat=("fp16", "bf16"),
              levels=_levels(max_abs=None, cosine=0.95, agreement=None, angle=5.0, drop=1.0, ids=0.9)),
)
PRECISIONS: Mapping[str, Precision] = MappingProxyType({p.name: p for p in _ROWS})


def get_precision(name: str | Precision) -> Precision:
    """The row of `name` (a row is returned as it is)."""
    if isinstance(name, Precision):
        return name
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise PrecisionError(f"unknown precision '{name}'; choose one of {', '.join(PRECISIONS)}") from None


def built_by(backend: str) -> tuple[str, ...]:
    """The precisions `backend` builds, in table order (its row of `engines.registry.BACKENDS`)."""
    return tuple(p.name for p in PRECISIONS.values() if backend in p.backends)


def by_looseness(names: Iterable[str | Precision] | None = None) -> tuple[str, ...]:
    """Precision names, tightest first (every precision when `names` is None)."""
    rows = PRECISIONS.values() if names is None else (get_precision(n) for n in names)
    return tuple(p.name for p in sorted(rows, key=lambda p: p.looseness))


def judged_precision(asked: str | Precision, executed: str) -> Precision:
    """The precision whose limits fit what an engine really computed: the looser of what was asked and what
    its backend reports ran, never tighter than asked (an fp16 graph run by fp32 kernels still has fp16
    weights; an OpenVINO "fp16" engine that ran bf16 has bf16 numerics). A report of something the asked
    precision may not run as ("mixed", unknown, a looser format nobody allowed) is not a reason to loosen."""
    asked = get_precision(asked)
    if not asked.may_run_as(executed) or executed not in PRECISIONS:
        return asked
    return asked.looser(PRECISIONS[executed])


# ----------------------------------------------------------------------------- the plan of one engine set

# The parts of a split layout that may take their own precision (`backbone=int8,heads=fp16`); a task name
# as a part sets that task's head alone.
PARTS = ("backbone", "heads")
WHOLE = "model"  # the graph role of a single-layout engine set
HEAD_PREFIX = "head_"


@dataclass(frozen=True)
class PrecisionPlan:
    """Which precision each graph of one engine set is built in: one for all of them (`whole`), or one per
    part of a split layout (`parts`: backbone, heads, then single task heads by name, in that order)."""

    whole: Precision | None = None
    parts: tuple[tuple[str, Precision], ...] = ()

    def __post_init__(self):
        if (self.whole is None) == (not self.parts):
            raise ValueError("a precision plan has one precision or per-part ones, not both or neither")

    # -- making one

    @classmethod
    def of(cls, precision: str | Precision) -> PrecisionPlan:
        """One precision for every graph."""
        return cls(whole=get_precision(precision))

    @classmethod
    def parse(cls, text: str, tasks: Iterable[str] = ()) -> PrecisionPlan:
        """A `--precision` value: a precision name, or parts like `backbone=int8,heads=fp16` whose names are
        parts or `tasks`. Checked against the table (not yet against a backend: `engine_plan` does that).
        A per-part value that gives the backbone and every head the same precision is that precision."""
        text = str(text)
        if "=" not in text:
            return cls.of(text)
        tasks = tuple(tasks)
        given: dict[str, Precision] = {}
        for item in text.split(","):
            name, sep, precision = (x.strip() for x in item.partition("="))
            if not sep or not name or not precision:
                raise PrecisionError(f"precision '{text}': write parts as backbone=PRECISION,heads=PRECISION "
                                     "(a task name sets that task's head alone)")
            if name not in PARTS and name not in tasks:
                raise PrecisionError(f"precision '{text}': unknown part '{name}'; parts are {', '.join(PARTS)} or "
                                     f"a task name ({', '.join(tasks)})")
            if precision not in PRECISIONS:
                raise PrecisionError(f"precision '{text}': unknown precision '{precision}' for {name}; "
                                     f"choose one of {', '.join(PRECISIONS)}")
            if name in given:
                raise PrecisionError(f"precision '{text}': {name} is given twice")
            given[name] = PRECISIONS[precision]
        if "backbone" not in given:
            raise PrecisionError(f"precision '{text}': give the backbone's precision too (backbone=...)")
        if set(given) == set(PARTS) and given["backbone"] == given["heads"]:
            return cls(whole=given["backbone"])
        order = [p for p in PARTS if p in given] + sorted(p for p in given if p not in PARTS)
        return cls(parts=tuple((p, given[p]) for p in order))

    # -- what it says

    def __str__(self) -> str:
        """The canonical name: 'fp16', or 'backbone=int8,heads=fp16' (backbone, heads, single heads by name)."""
        if self.whole is not None:
            return self.whole.name
        return ",".join(f"{part}={precision.name}" for part, precision in self.parts)

    @property
    def per_part(self) -> bool:
        """Whether parts have their own precisions (which needs the split layout)."""
        return self.whole is None

    @property
    def part_precisions(self) -> dict[str, Precision]:
        """{part: precision} as given ({} for one precision)."""
        return dict(self.parts)

    @property
    def used(self) -> tuple[Precision, ...]:
        """Every precision the engine set is built in, tightest first."""
        found = {self.whole} if self.whole is not None else {p for _, p in self.parts}
        return tuple(sorted(found, key=lambda p: p.looseness))

    def uses(self, prop: str) -> bool:
        """Whether any graph's precision has the true property `prop` (e.g. `plan.uses("calibrated")`)."""
        return any(getattr(p, prop) for p in self.used)

    @property
    def loosest(self) -> Precision:
        return self.used[-1]

    def for_role(self, role: str) -> Precision:
        """The precision of one graph role: "model" (single layout), "backbone" or "head_<task>"."""
        if self.whole is not None:
            return self.whole
        if role == WHOLE:
            raise PrecisionError(f"precision '{self}' gives parts their own precision; it needs the split layout "
                                 "(--layout split)")
        parts = self.part_precisions
        if role.startswith(HEAD_PREFIX):
            task = role[len(HEAD_PREFIX):]
            found = parts.get(task, parts.get("heads"))
            if found is None:
                raise PrecisionError(f"precision '{self}' leaves the head(s) of {task} without a precision; "
                                     "add heads=PRECISION")
            return found
        return parts["backbone"]

    def for_roles(self, roles: Iterable[str]) -> dict[str, Precision]:
        """{role: precision} for every role; every head without a precision is named in one error."""
        roles = list(roles)
        if self.whole is not None:
            return dict.fromkeys(roles, self.whole)
        if WHOLE in roles:
            self.for_role(WHOLE)
        parts = self.part_precisions
        missing = [r[len(HEAD_PREFIX):] for r in roles
                   if r.startswith(HEAD_PREFIX) and r[len(HEAD_PREFIX):] not in parts and "heads" not in parts]
        if missing:
            raise PrecisionError(f"precision '{self}' leaves the head(s) of {', '.join(missing)} without a "
                                 "precision; add heads=PRECISION")
        return {r: self.for_role(r) for r in roles}

    def for_task(self, task: str) -> Precision:
        """The precision a task is judged at: the loosest of the parts it runs through (backbone, its head)."""
        if self.whole is not None:
            return self.whole
        return self.for_role("backbone").looser(self.for_role(HEAD_PREFIX + task))

    def tasks_named(self) -> tuple[str, ...]:
        """The task names used as parts (checked against the model once it is known)."""
        return tuple(p for p, _ in self.parts if p not in PARTS)
