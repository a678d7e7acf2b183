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
from dataclasses import dataclass

import numpy as np

from export.checking.results import (
    Check,
    EngineCheck,
    EngineInfo,
    Judgement,
    MetricComparison,
    TaskResult,
    TensorAgreement,
)
from export.checking.tolerances import Tolerance, Tolerances
from export.errors import ExportError
from mtlora.metrics import make_evaluator
from mtlora.tasks import AGREEMENTS, KINDS, get_task, kind_of, postprocess


@dataclass
class EvalBatch:
    """Normalised input (N, 3, H, W), the reference outputs for it, and labels when known."""

    image: np.ndarray
    reference: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] | None = None


class _TensorMeter:
    """Streaming tensor agreement: max / mean absolute error, cosine, and how many positions hold a
    non-finite value in the engine's output or the reference (max_abs is then infinite)."""

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
        # A NaN on either side must count: dropped, it would vanish from max() and the error look smaller.
        finite = np.isfinite(e) & np.isfinite(r)
        self.non_finite += int((~finite).sum())
        e, r = np.where(finite, e, 0.0), np.where(finite, r, 0.0)
        diff = np.abs(e - r)
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.sum_abs += float(diff.sum())
        self.count += diff.size
        self.dot += float(e @ r)
        self.norm_engine += float(e @ e)
        self.norm_reference += float(r @ r)

    def result(self) -> TensorAgreement:
        denominator = math.sqrt(self.norm_engine * self.norm_reference)
        cosine = self.dot / denominator if denominator > 0 else (1.0 if self.norm_engine == self.norm_reference else 0.0)
        return TensorAgreement(max_abs=math.inf if self.non_finite else self.max_abs,
                               mean_abs=self.sum_abs / max(self.count, 1), cosine=cosine, non_finite=self.non_finite)


class TaskCheck:
    """Everything measured for one task of one engine."""

    def __init__(self, task: str, channels: int, postprocessed: bool = False):
        self.task = task
        self.channels = channels
        self.postprocessed = postprocessed
        self.tensor = _TensorMeter()
        self.agreement_sum = 0.0
        self.pixels = 0
        # The kind of the engine's output: the task's own, or what in-graph post-processing makes of it.
        self.kind = kind_of(task, postprocessed)
        self.spec = KINDS[self.kind]
        self.agreement = AGREEMENTS[self.spec.agreement] if self.spec.agreement else None
        self.engine_meter = None
        self.reference_meter = None

    def update(self, engine: np.ndarray, reference: np.ndarray, label: np.ndarray | None) -> None:
        """`reference` is always the original model's raw output; a post-processed engine is compared
        with the same post-processing of it."""
        if self.postprocessed:
            reference = postprocess(self.task, reference)
        if engine.shape != reference.shape:
            raise ExportError(
                f"engine output '{self.task}' has shape {engine.shape}, the reference has {reference.shape}"
            )
        self.tensor.update(engine, reference)
        if self.agreement is not None:
            total, count = self.agreement.measure(engine, reference)
            self.agreement_sum += total
            self.pixels += count
        if label is not None and get_task(self.task).spec.meters:
            if self.engine_meter is None:
                self.engine_meter = make_evaluator(self.task, self.channels)
                self.reference_meter = make_evaluator(self.task, self.channels)
            # The meters take what the model outputs (logits): probabilities go back through the logit.
            self.engine_meter.update(self.spec.for_meter(engine), label)
            self.reference_meter.update(self.spec.for_meter(reference), label)

    def result(self, tolerance: Tolerance, judged: Judgement | None = None) -> TaskResult:
        measured = {}
        if self.agreement is not None:
            measured[self.agreement.measurement] = self.agreement_sum / max(self.pixels, 1)
        agreement, angle = measured.get("argmax_agreement"), measured.get("angle_deg")
        metrics = None
        if self.engine_meter is not None:
            task = get_task(self.task)
            metrics = MetricComparison(task.metric, task.higher_is_better, _floats(self.engine_meter.result()),
                                       _floats(self.reference_meter.result()))
        tensor = self.tensor.result()
        measured |= {"max_abs": tensor.max_abs, "mean_abs": tensor.mean_abs, "cosine": tensor.cosine}
        if metrics is not None:
            measured[f"{metrics.primary}_drop"] = metrics.drop
        checks = tuple(Check(name, measured[name], limit, op)
                       for name, limit, op in _limits(tolerance, metrics)
                       if limit is not None and measured.get(name) is not None)
        return TaskResult(self.task, tensor, agreement, angle, metrics, checks, judged)


def _floats(result: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}


def _limits(tolerance: Tolerance, metrics: MetricComparison | None) -> list[tuple[str, float | None, str]]:
    """(measurement, limit, op) for every limit of a tolerance, in report order."""
    limits = [("max_abs", tolerance.max_abs, "<="), ("mean_abs", tolerance.mean_abs, "<="),
              ("cosine", tolerance.min_cosine, ">="), ("argmax_agreement", tolerance.min_argmax_agreement, ">="),
              ("angle_deg", tolerance.max_angle_deg, "<=")]
    if metrics is not None:
        limits.append((f"{metrics.primary}_drop", tolerance.max_metric_drop, "<="))
    return limits


class EngineChecker:
    """Accumulates one engine's outputs batch by batch; `finish` judges every task.

    `precision` is what was asked for; `finish` judges each task by the limits `tolerances.judge` gives for
    it and for what the engine reports it ran (`EngineInfo.precision_executed`), and records whose they are.
    """

    def __init__(self, task_channels: Mapping[str, int], precision: str, tolerances: Tolerances | None = None,
                 postprocessed: bool = False):
        self.precision = precision
        self.tolerances = tolerances or Tolerances()
        self.postprocessed = postprocessed
        self.checks = {t: TaskCheck(t, c, postprocessed) for t, c in task_channels.items()}
        self.samples = 0
        self.labelled = False

    def update(self, outputs: Mapping[str, np.ndarray], batch: EvalBatch) -> None:
        for task, check in self.checks.items():
            if task not in outputs:
                raise ExportError(f"the engine has no output '{task}'; it produces {sorted(outputs)}")
            label = batch.labels.get(task) if batch.labels else None
            self.labelled = self.labelled or label is not None
            check.update(np.asarray(outputs[task]), batch.reference[task], label)
        self.samples += batch.image.shape[0]

    def finish(self, engine: EngineInfo, reference_source: str = "pytorch") -> EngineCheck:
        if self.samples == 0:
            raise ExportError("the evaluation set is empty; give --eval-data with at least one image")
        tasks = {task: check.result(*self.tolerances.judge(self.precision, engine.precision_executed, task, check.kind))
                 for task, check in self.checks.items()}
        return EngineCheck(engine, self.samples, self.labelled, reference_source, tasks)


def check_engine(
    infer,
    batches: Iterable[EvalBatch],
    task_channels: Mapping[str, int],
    precision: str,
    tolerances: Tolerances | None = None,
    engine: EngineInfo | None = None,
    reference_source: str = "pytorch",
    input_name: str = "image",
) -> EngineCheck:
    """Run `infer({input_name: batch}) -> {task: array}` over `batches` and judge every task."""
    checker = EngineChecker(task_channels, precision, tolerances)
    for batch in batches:
        checker.update(infer({input_name: batch.image}), batch)
    return checker.finish(engine or EngineInfo("?", precision), reference_source)
