"""Compare an engine with the PyTorch reference, task by task, with flat memory.

Per task it accumulates tensor agreement (max and mean absolute error, cosine
similarity), task agreement with the reference (argmax / binarised pixel
agreement, angle between normals), and, when labels are given, the task's
metrics for both the engine and the reference, so that a drop can be judged.
Numpy only: it runs on a device without PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from export.checking.tolerances import Tolerance, Tolerances
from mtlora.metrics import TASK_METRICS, make_evaluator

CLASS_TASKS = ("semseg", "human_parts")
BINARY_TASKS = ("sal", "edge")


@dataclass
class EvalBatch:
    """Normalised input (N, 3, H, W), the reference outputs for it, and labels when known."""

    image: np.ndarray
    reference: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] | None = None


class TensorAgreement:
    def __init__(self):
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.dot = 0.0
        self.norm_engine = 0.0
        self.norm_reference = 0.0
        self.non_finite = 0

    def update(self, engine: np.ndarray, reference: np.ndarray) -> None:
        e = engine.astype(np.float64).ravel()
        r = reference.astype(np.float64).ravel()
        finite = np.isfinite(e)
        self.non_finite += int((~finite).sum())
        e = np.where(finite, e, 0.0)
        diff = np.abs(e - r)
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.sum_abs += float(diff.sum())
        self.count += diff.size
        self.dot += float(e @ r)
        self.norm_engine += float(e @ e)
        self.norm_reference += float(r @ r)

    def result(self) -> dict[str, float]:
        denominator = math.sqrt(self.norm_engine * self.norm_reference)
        cosine = self.dot / denominator if denominator > 0 else (1.0 if self.norm_engine == self.norm_reference else 0.0)
        return {
            "max_abs": math.inf if self.non_finite else self.max_abs,
            "mean_abs": self.sum_abs / max(self.count, 1),
            "cosine": cosine,
            "non_finite": self.non_finite,
        }


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


class TaskCheck:
    """Everything measured for one task of one engine."""

    def __init__(self, task: str, channels: int):
        self.task = task
        self.channels = channels
        self.tensor = TensorAgreement()
        self.agree = 0
        self.pixels = 0
        self.angle_sum = 0.0
        self.engine_meter = None
        self.reference_meter = None

    def update(self, engine: np.ndarray, reference: np.ndarray, label: np.ndarray | None) -> None:
        if engine.shape != reference.shape:
            from export.errors import ExportError

            raise ExportError(
                f"engine output '{self.task}' has shape {engine.shape}, the reference has {reference.shape}"
            )
        self.tensor.update(engine, reference)
        if self.task in CLASS_TASKS:
            self.agree += int((engine.argmax(1) == reference.argmax(1)).sum())
            self.pixels += engine.shape[0] * engine.shape[2] * engine.shape[3]
        elif self.task in BINARY_TASKS:
            self.agree += int(((engine > 0) == (reference > 0)).sum())
            self.pixels += engine.size
        elif self.task == "normals":
            e, r = _unit(engine.astype(np.float64)), _unit(reference.astype(np.float64))
            angle = np.degrees(2 * np.arctan2(np.linalg.norm(e - r, axis=1), np.linalg.norm(e + r, axis=1)))
            self.angle_sum += float(angle.sum())
            self.pixels += angle.size
        if label is not None and self.task in TASK_METRICS:
            if self.engine_meter is None:
                classes = self.channels if self.task in CLASS_TASKS else None
                self.engine_meter = make_evaluator(self.task, classes)
                self.reference_meter = make_evaluator(self.task, classes)
            self.engine_meter.update(engine, label)
            self.reference_meter.update(reference, label)

    def measurements(self) -> dict:
        out: dict = {"tensor": self.tensor.result()}
        if self.task in CLASS_TASKS or self.task in BINARY_TASKS:
            out["argmax_agreement"] = self.agree / max(self.pixels, 1)
        if self.task == "normals":
            out["angle_deg"] = self.angle_sum / max(self.pixels, 1)
        if self.engine_meter is not None:
            metric, higher_is_better = TASK_METRICS[self.task]
            engine_metrics = _floats(self.engine_meter.result())
            reference_metrics = _floats(self.reference_meter.result())
            drop = reference_metrics[metric] - engine_metrics[metric]
            out["metrics"] = {
                "primary": metric,
                "higher_is_better": higher_is_better,
                "engine": engine_metrics,
                "reference": reference_metrics,
                "drop": drop if higher_is_better else -drop,
            }
        return out


def _floats(result: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}


def _judge(measured: dict, tolerance: Tolerance) -> list[dict]:
    checks = []

    def add(name: str, value: float, limit: float | None, op: str) -> None:
        if limit is None or value is None:
            return
        passed = value <= limit if op == "<=" else value >= limit
        checks.append({"name": name, "value": value, "limit": limit, "op": op, "passed": bool(passed and math.isfinite(value))})

    tensor = measured["tensor"]
    add("max_abs", tensor["max_abs"], tolerance.max_abs, "<=")
    add("mean_abs", tensor["mean_abs"], tolerance.mean_abs, "<=")
    add("cosine", tensor["cosine"], tolerance.min_cosine, ">=")
    add("argmax_agreement", measured.get("argmax_agreement"), tolerance.min_argmax_agreement, ">=")
    add("angle_deg", measured.get("angle_deg"), tolerance.max_angle_deg, "<=")
    if "metrics" in measured:
        add(f"{measured['metrics']['primary']}_drop", measured["metrics"]["drop"], tolerance.max_metric_drop, "<=")
    return checks


@dataclass
class EngineCheck:
    """The verdict for one engine; its truth value is whether every check passed."""

    engine: dict
    samples: int
    labelled: bool
    reference_source: str
    tasks: dict[str, dict] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for t in self.tasks.values() for c in t["checks"])

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {
            "engine": self.engine,
            "samples": self.samples,
            "labelled": self.labelled,
            "reference": self.reference_source,
            "passed": self.passed,
            "tasks": self.tasks,
        }


class EngineChecker:
    """Accumulates one engine's outputs batch by batch; `finish` judges every task."""

    def __init__(self, task_channels: Mapping[str, int], precision: str, tolerances: Tolerances | None = None):
        self.precision = precision
        self.tolerances = tolerances or Tolerances()
        self.checks = {t: TaskCheck(t, c) for t, c in task_channels.items()}
        self.samples = 0
        self.labelled = False

    def update(self, outputs: Mapping[str, np.ndarray], batch: EvalBatch) -> None:
        for task, check in self.checks.items():
            if task not in outputs:
                from export.errors import ExportError

                raise ExportError(f"the engine has no output '{task}'; it produces {sorted(outputs)}")
            label = batch.labels.get(task) if batch.labels else None
            self.labelled = self.labelled or label is not None
            check.update(np.asarray(outputs[task]), batch.reference[task], label)
        self.samples += batch.image.shape[0]

    def finish(self, engine_info: dict | None = None, reference_source: str = "pytorch") -> EngineCheck:
        if self.samples == 0:
            from export.errors import ExportError

            raise ExportError("the evaluation set is empty; give --eval-data with at least one image")
        result = EngineCheck(engine=dict(engine_info or {}), samples=self.samples, labelled=self.labelled,
                             reference_source=reference_source)
        for task, check in self.checks.items():
            measured = check.measurements()
            tolerance = self.tolerances.for_task(self.precision, task)
            result.tasks[task] = {**measured, "checks": _judge(measured, tolerance)}
        return result


def check_engine(
    infer,
    batches: Iterable[EvalBatch],
    task_channels: Mapping[str, int],
    precision: str,
    tolerances: Tolerances | None = None,
    engine_info: dict | None = None,
    reference_source: str = "pytorch",
    input_name: str = "image",
) -> EngineCheck:
    """Run `infer({input_name: batch}) -> {task: array}` over `batches` and judge every task."""
    checker = EngineChecker(task_channels, precision, tolerances)
    for batch in batches:
        checker.update(infer({input_name: batch.image}), batch)
    return checker.finish(engine_info, reference_source)
