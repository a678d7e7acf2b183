"""Accuracy tolerances per precision and kind of task, overridable per task from a JSON file.

fp32 engines are judged on the tensors themselves; 16-bit and int8 engines are
judged by what a user of the task would notice (mIoU drop, angle of normals,
argmax agreement with the PyTorch reference).

Override file format (JSON)::

    {"fp16": {"semseg": {"max_metric_drop": 0.8}},
     "int8": {"*": {"min_argmax_agreement": 0.9}}}

Keys are precisions, then task names (`*` for every task), then limit names.
The file is checked against this schema, and against the model's tasks once
they are known: a misspelt task or limit, a negative, NaN or boolean limit, or a
limit that cannot apply to the task (an angle for a class map) is an error, so a
tighter CI limit can never silently vanish.

Which limits judge an engine (`Tolerances.judge`): default limits follow the
precision that ran; limits a user wrote are never loosened. A task is judged by
the file's entry for the precision that ran, else the file's entry for the
precision asked (over the defaults of the one that ran), else the defaults of
the precision that ran. "Ran" is the numerics the engine had, not only its
kernels: the looser of asked and reported (`engines.precision.judged_precision`),
so an fp16 graph that ran fp32 kernels is still judged as fp16, never tighter.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from engines.precision import PRECISIONS, Precision, PrecisionError, get_precision, judged_precision
from export.checking.results import DEFAULT_LIMITS, Judgement
from export.errors import ExportError
from mtlora.tasks import KINDS, TASKS

EVERY_TASK = "*"


@dataclass(frozen=True)
class Tolerance:
    """Limits for one task of one engine; None means not checked.

    - max_abs / mean_abs / min_cosine: tensor agreement with the PyTorch reference.
    - min_argmax_agreement: fraction of pixels whose class (or binarised map) equals the reference's.
    - max_angle_deg: mean angular difference of normals to the reference, in degrees.
    - max_metric_drop: how much worse the task's primary metric against labels may be than the
      reference's (mIoU / odsF points, degrees of normals error, metres of depth RMSE).
    """

    max_abs: float | None = None
    mean_abs: float | None = None
    min_cosine: float | None = None
    min_argmax_agreement: float | None = None
    max_angle_deg: float | None = None
    max_metric_drop: float | None = None


LIMIT_NAMES = tuple(f.name for f in fields(Tolerance))
# The range each limit may take: cosine is in [-1, 1], agreement a fraction, the rest non-negative.
LIMIT_RANGES = {"min_cosine": (-1.0, 1.0), "min_argmax_agreement": (0.0, 1.0)}


def kind_limits(kind: str) -> tuple[str, ...]:
    """The limits a kind of task has a measurement for (`export.checking.accuracy` measures these)."""
    return KINDS[kind].limit_names


# A precision's levels, which each kind's row turns into its limits (`mtlora.tasks.TaskKind.default_limits`):
# max_abs and cosine for tensors, agreement for pixels that keep their class or side, angle for normals (degrees),
# drop for the primary metric against labels, ids the floor for post-processed class ids (no tensor to compare).
# They are the precision table's (`engines.precision.PRECISIONS`, each row's `levels`).
LEVELS: dict[str, Mapping[str, float | None]] = {p.name: p.levels for p in PRECISIONS.values()}


def _precision(name: str | Precision) -> Precision:
    try:
        return get_precision(name)
    except PrecisionError:
        raise ExportError(f"no tolerances for precision '{name}'; use {', '.join(PRECISIONS)}") from None


def default_tolerance(precision: str | Precision, kind: str) -> Tolerance:
    """The limits of a kind of task at `precision` before any override."""
    return Tolerance(**KINDS[kind].default_limits(_precision(precision).levels))


def _parse_limits(raw, where: str) -> dict[str, float | None]:
    if not isinstance(raw, dict):
        raise ExportError(f"{where}: expected an object of limits, e.g. {{\"max_metric_drop\": 0.8}}")
    unknown = sorted(set(raw) - set(LIMIT_NAMES))
    if unknown:
        raise ExportError(f"{where}: unknown limit(s) {unknown}; known: {', '.join(LIMIT_NAMES)}")
    limits: dict[str, float | None] = {}
    for name, value in raw.items():
        if value is None:
            limits[name] = None
            continue
        # bool is an int to Python; `true` is never a limit.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ExportError(f"{where}.{name}: {value!r} is not a finite number (or null to switch the check off)")
        low, high = LIMIT_RANGES.get(name, (0.0, math.inf))
        if not low <= value <= high:
            raise ExportError(f"{where}.{name}: {value} is outside [{low}, {high}]")
        limits[name] = float(value)
    return limits


class Tolerances:
    """Defaults per precision and kind of task, with per-task overrides."""

    def __init__(self, overrides=None, source: str = "tolerances"):
        self.source = source
        self.overrides: dict[str, dict[str, dict[str, float | None]]] = {}
        if overrides is None:
            return
        if not isinstance(overrides, dict):
            raise ExportError(f"{source}: must be a JSON object of precisions, e.g. "
                              "{\"fp16\": {\"semseg\": {\"max_metric_drop\": 0.8}}}")
        for precision, per_task in overrides.items():
            if precision not in PRECISIONS:
                raise ExportError(f"{source}: unknown precision '{precision}'; use {', '.join(PRECISIONS)}")
            if not isinstance(per_task, dict):
                raise ExportError(f"{source}: '{precision}' must map task names (or \"*\") to limits")
            for task in per_task:
                if task != EVERY_TASK and task not in TASKS:
                    raise ExportError(f"{source}: {precision}.{task}: unknown task; known: *, {', '.join(TASKS)}")
            self.overrides[precision] = {
                task: _parse_limits(limits, f"{source}: {precision}.{task}") for task, limits in per_task.items()
            }
            for task, limits in self.overrides[precision].items():
                if task == EVERY_TASK:
                    continue
                kind = TASKS[task].kind
                wrong = sorted(set(limits) - set(kind_limits(kind)))
                if wrong:
                    raise ExportError(f"{source}: {precision}.{task}: {', '.join(wrong)} cannot apply to a "
                                      f"{kind.replace('_', ' ')} task; it takes {', '.join(kind_limits(kind))}")

    def identity(self) -> dict[str, str]:
        """What a baseline records of these tolerances: where they came from, and a digest of the limits
        in force (defaults included), so that two files with the same limits are the same tolerances."""
        limits = {"defaults": {p: {k: vars(default_tolerance(p, k)) for k in KINDS} for p in LEVELS},
                  "overrides": self.overrides}
        digest = hashlib.sha256(json.dumps(limits, sort_keys=True).encode()).hexdigest()
        return {"source": self.source if self.overrides else "defaults", "sha256": digest}

    @classmethod
    def from_file(cls, path: str | Path | None) -> Tolerances:
        if path is None:
            return cls()
        from export.artifacts.files import read_json

        path = Path(path)
        data = read_json(path, corrupt=f"{path}: tolerance file is not valid JSON",
                         missing=f"{path}: tolerance file not found")
        return cls(data, source=str(path))

    def check_tasks(self, tasks: Iterable[str]) -> None:
        """Refuse overrides for a task the model does not have: a typo must not drop a CI limit."""
        tasks = set(tasks)
        for precision, per_task in self.overrides.items():
            missing = sorted(t for t in per_task if t != EVERY_TASK and t not in tasks)
            if missing:
                raise ExportError(f"{self.source}: {precision} sets limits for {', '.join(missing)}, which the "
                                  f"model does not have; its tasks: {', '.join(sorted(tasks))}")

    def entry(self, precision: str, task: str, kind: str) -> dict[str, float | None]:
        """The limits this file gives `task` (its `*` entry, then its own) at `precision` that apply to its kind."""
        override = self.overrides.get(precision, {})
        limits: dict[str, float | None] = {}
        for key in (EVERY_TASK, task):
            limits |= {k: v for k, v in override.get(key, {}).items() if k in kind_limits(kind)}
        return limits

    def judge(self, asked: str | Precision, executed: str, task: str, kind: str | None = None, *,
              judged_as: str | Precision | None = None) -> tuple[Tolerance, Judgement]:
        """The limits of `task` on an engine asked for `asked` whose backend reports `executed` ran, and
        whose they are (see the module's docstring). `judged_as` (default: the looser of asked and executed)
        is the precision whose numerics the task had, when the caller worked it out per part."""
        asked = _precision(asked)
        ran = _precision(judged_as) if judged_as is not None else judged_precision(asked, executed)
        kind = kind or TASKS[task].kind
        tolerance = default_tolerance(ran, kind)
        for entry in dict.fromkeys((ran.name, asked.name)):
            written = self.entry(entry, task, kind)
            if written:
                return replace(tolerance, **written), Judgement(asked.name, executed, ran.name, self.source, entry)
        return tolerance, Judgement(asked.name, executed, ran.name, DEFAULT_LIMITS, ran.name)

    def for_task(self, precision: str, task: str, kind: str | None = None) -> Tolerance:
        """The limits of `task` at `precision` (asked and ran); `kind` is its output's kind (post-processed or not)."""
        return self.judge(precision, precision, task, kind)[0]
