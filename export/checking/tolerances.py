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
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from export.errors import ExportError
from mtlora.tasks import KINDS, TASKS

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
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
LEVELS: dict[str, dict[str, float | None]] = {
    # fp32 is judged on the tensors; class ids (post-processed) may differ only where two classes tie.
    "fp32": {"max_abs": 1e-3, "cosine": 0.99999, "agreement": None, "angle": None, "drop": None, "ids": 0.9999},
    "fp16": {"max_abs": None, "cosine": 0.999, "agreement": 0.99, "angle": 0.5, "drop": 0.5, "ids": 0.99},
    "bf16": {"max_abs": None, "cosine": 0.99, "agreement": 0.97, "angle": 1.5, "drop": 0.5, "ids": 0.97},
    # INT8 is judged by the task metrics against labels (mIoU / odsF drop <= 1 point, normals error
    # <= 0.5 degrees worse); the cosine, angle and class-id floors only catch an engine that is broken
    # outright, and are what remains when the evaluation set has no labels.
    "int8": {"max_abs": None, "cosine": 0.95, "agreement": None, "angle": 5.0, "drop": 1.0, "ids": 0.9},
}


def default_tolerance(precision: str, kind: str) -> Tolerance:
    """The limits of a kind of task at `precision` before any override."""
    return Tolerance(**KINDS[kind].default_limits(LEVELS[precision]))


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

    def for_task(self, precision: str, task: str, kind: str | None = None) -> Tolerance:
        """The limits of `task` at `precision`; `kind` is its output's kind (post-processed or not)."""
        if precision not in LEVELS:
            raise ExportError(f"no tolerances for precision '{precision}'; use {', '.join(PRECISIONS)}")
        kind = kind or TASKS[task].kind
        tolerance = default_tolerance(precision, kind)
        override = self.overrides.get(precision, {})
        for key in (EVERY_TASK, task):
            if key in override:
                applicable = {k: v for k, v in override[key].items() if k in kind_limits(kind)}
                tolerance = replace(tolerance, **applicable)
        return tolerance
