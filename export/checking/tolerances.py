"""Accuracy tolerances per precision, overridable per task from a JSON file.

fp32 engines are judged on the tensors themselves; fp16 and int8 engines are
judged by what a user of the task would notice (mIoU drop, angle of normals,
argmax agreement with the PyTorch reference).

Override file format (JSON)::

    {"fp16": {"semseg": {"max_metric_drop": 0.8}},
     "int8": {"*": {"min_argmax_agreement": 0.9}}}

Keys are precisions, then task names (`*` for every task), then limit names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from export.errors import ExportError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


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


_SEGMENTATION = ("semseg", "human_parts")

DEFAULTS: dict[str, dict[str, Tolerance]] = {
    "fp32": {"*": Tolerance(max_abs=1e-3, min_cosine=0.99999)},
    "fp16": {
        "*": Tolerance(min_cosine=0.999, max_metric_drop=0.5),
        "semseg": Tolerance(min_cosine=0.999, min_argmax_agreement=0.99, max_metric_drop=0.5),
        "human_parts": Tolerance(min_cosine=0.999, min_argmax_agreement=0.99, max_metric_drop=0.5),
        "sal": Tolerance(min_cosine=0.999, min_argmax_agreement=0.99, max_metric_drop=0.5),
        "normals": Tolerance(min_cosine=0.999, max_angle_deg=0.5, max_metric_drop=0.5),
    },
    "bf16": {
        "*": Tolerance(min_cosine=0.99, max_metric_drop=0.5),
        "semseg": Tolerance(min_cosine=0.99, min_argmax_agreement=0.97, max_metric_drop=0.5),
        "human_parts": Tolerance(min_cosine=0.99, min_argmax_agreement=0.97, max_metric_drop=0.5),
        "normals": Tolerance(min_cosine=0.99, max_angle_deg=1.5, max_metric_drop=0.5),
    },
    # INT8 is judged by the task metrics against labels (mIoU / odsF drop <= 1 point, normals error
    # <= 0.5 degrees worse); the cosine and angle floors only catch an engine that is broken outright,
    # and are what remains when the evaluation set has no labels.
    "int8": {
        "*": Tolerance(min_cosine=0.95, max_metric_drop=1.0),
        "normals": Tolerance(min_cosine=0.95, max_angle_deg=5.0, max_metric_drop=0.5),
    },
}


def _parse_limits(raw: dict, where: str) -> dict[str, float]:
    names = {f.name for f in fields(Tolerance)}
    if not isinstance(raw, dict):
        raise ExportError(f"{where}: expected an object of limits")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ExportError(f"{where}: unknown limit(s) {unknown}; known: {', '.join(sorted(names))}")
    try:
        return {k: None if v is None else float(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ExportError(f"{where}: limits must be numbers or null") from None


class Tolerances:
    """Defaults per precision, with per-task overrides."""

    def __init__(self, overrides: dict | None = None):
        self.overrides: dict[str, dict[str, dict[str, float]]] = {}
        for precision, per_task in (overrides or {}).items():
            if precision not in PRECISIONS:
                raise ExportError(f"tolerances: unknown precision '{precision}'; use {', '.join(PRECISIONS)}")
            if not isinstance(per_task, dict):
                raise ExportError(f"tolerances: '{precision}' must map task names to limits")
            self.overrides[precision] = {
                task: _parse_limits(limits, f"tolerances.{precision}.{task}") for task, limits in per_task.items()
            }

    @classmethod
    def from_file(cls, path: str | Path | None) -> Tolerances:
        if path is None:
            return cls()
        path = Path(path)
        try:
            return cls(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ExportError(f"{path}: tolerance file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExportError(f"{path}: tolerance file is not valid JSON ({err})") from None

    def for_task(self, precision: str, task: str) -> Tolerance:
        if precision not in DEFAULTS:
            raise ExportError(f"no tolerances for precision '{precision}'; use {', '.join(PRECISIONS)}")
        defaults = DEFAULTS[precision]
        tolerance = defaults.get(task, defaults["*"])
        override = self.overrides.get(precision, {})
        for key in ("*", task):
            if key in override:
                tolerance = replace(tolerance, **override[key])
        return tolerance

    def to_dict(self) -> dict:
        return self.overrides
