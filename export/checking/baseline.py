"""The CI regression gate: compare a new report with a stored baseline, task by task.

A task metric that got worse by more than its tolerance, or an agreement /
angle / cosine that moved against the baseline by more than a small slack, is a
regression. An engine or task the baseline has and the new report lacks is one
too, so a gate can never pass by building less. A baseline of another model or
made with other settings does not apply at all, and one holding a NaN or an
infinity is refused: a NaN makes every comparison false, so it would pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from export.checking.results import Report, TaskResult
from export.errors import ExportError

# How far a value may move against a baseline before the gate fails; `worse` says which way is worse.
BASELINE_SLACK = {"argmax_agreement": 0.01, "angle_deg": 0.5, "cosine": 1e-3}
HIGHER_IS_WORSE = {"angle_deg"}
DEFAULT_METRIC_SLACK = 0.5


@dataclass
class GateResult:
    """What the gate found: regressions (one line each), how many task results it compared, and why the
    baseline does not apply to this report at all (another model, or nothing to compare), if it does not."""

    regressions: list[str] = field(default_factory=list)
    compared: int = 0
    mismatch: str = ""
    other_model_only: bool = False  # the mismatch is the model alone, which --allow-other-model waives

    @property
    def applies(self) -> bool:
        return not self.mismatch and self.compared > 0

    @property
    def passed(self) -> bool:
        return self.applies and not self.regressions


# What a report's identity records, and how a mismatch is named. The model: tasks, channels, input size
# and weights. The settings that change what the outputs mean or how they are compared: in-graph
# post-processing, the graph layout, the evaluation data (its source, count and a digest of its inputs)
# and the tolerances (a digest of the limits in force). `--allow-other-model` waives the model rows only.
MODEL_IDENTITY = (("tasks", "tasks"), ("output_channels", "output channels per task"), ("input_size", "input size"),
                  ("source_sha256", "weights (checkpoint SHA-256)"))
SETTINGS_IDENTITY = (("postprocessed", "post-processing (--postprocess)"), ("layout", "layout (--layout)"),
                     ("evaluation_data", "evaluation data (--eval-data, --eval-samples)"),
                     ("tolerances", "tolerances (--tolerances)"))
# Reports written before a setting was recorded always recorded its default this way: no key means False.
IDENTITY_DEFAULTS = {"postprocessed": False}


def _describe(value) -> str:
    """A setting's value for people: digests shortened, the rest as written."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {str(v)[:12] if k == 'sha256' else v}" for k, v in sorted(value.items()))
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return str(value)


# The parts of a recorded setting that must match: paths differ between machines, digests do not (the same
# images read from an evalset or made anew are the same evaluation data). Inputs of another input size
# differ in their digest by necessity, so across models of other sizes only their kind and count must match.
COMPARED_PARTS = {"tolerances": ("sha256",), "evaluation_data": ("samples", "sha256")}
COMPARED_ACROSS_INPUT_SIZES = {"evaluation_data": ("kind", "samples")}


def _comparable(key: str, value, other_input_size: bool):
    parts = (COMPARED_ACROSS_INPUT_SIZES if other_input_size else {}).get(key) or COMPARED_PARTS.get(key)
    if parts and isinstance(value, dict):
        return {k: value.get(k) for k in parts}
    return value


def identity_mismatch(report: Report, baseline: Report, allow_other_model: bool = False) -> str:
    """Why `baseline` does not apply to `report` ('' when it does): another model (tasks, output channels,
    input size, the source checkpoint's SHA-256), or another setting that changes what the outputs mean
    or how they are compared. With `allow_other_model` only the settings must match."""
    new, old = report.identity, baseline.identity
    if not old:
        return "the baseline does not say which model it was made from (written by an older version)"
    if not new:
        return "the new report does not say which model it was made from"
    rows = SETTINGS_IDENTITY if allow_other_model else MODEL_IDENTITY + SETTINGS_IDENTITY
    other_size = allow_other_model and new.get("input_size") != old.get("input_size")
    for key, what in rows:
        default = IDENTITY_DEFAULTS.get(key)
        now, before = new.get(key, default), old.get(key, default)
        if before is None and now is not None:
            return f"the baseline does not record its {what} (written by an older version)"
        if _comparable(key, now, other_size) != _comparable(key, before, other_size):
            return f"other {what}: {_describe(now)} now, {_describe(before)} in the baseline"
    return ""


def _task_numbers(task: TaskResult) -> dict[str, float]:
    """Every number of a task result, by the field name a report file uses."""
    numbers = {f"tensor.{k}": v for k, v in task.tensor.to_dict().items()}
    numbers.update({"argmax_agreement": task.agreement, "angle_deg": task.angle_deg})
    if task.metrics is not None:
        numbers.update({f"metrics.engine.{k}": v for k, v in task.metrics.engine.items()})
        numbers.update({f"metrics.reference.{k}": v for k, v in task.metrics.reference.items()})
    for check in task.checks:
        numbers[f"checks.{check.name}.value"] = check.value
        numbers[f"checks.{check.name}.limit"] = check.limit
    return {k: v for k, v in numbers.items() if v is not None}


def non_finite_fields(report: Report) -> list[str]:
    """`engine/task: field` for every NaN, +Inf or -Inf number among a report's task results."""
    return [f"{engine.key}/{name}: {field_name}" for engine in report.engines for name, task in engine.tasks.items()
            for field_name, value in _task_numbers(task).items() if not math.isfinite(value)]


def refuse_non_finite(report: Report, where: str) -> None:
    """A baseline holding a NaN or an infinity cannot judge anything (a NaN makes every comparison false,
    so it would pass): one error naming the file, the first fields and how many there are."""
    bad = non_finite_fields(report)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ExportError(f"{where}: {len(bad)} non-finite value(s) (NaN or Inf): {'; '.join(bad[:3])}{more}; "
                          "make the baseline from a build whose checks produced finite numbers")


def _metric_regression(key: str, task: str, old: TaskResult, new: TaskResult, slack: float | None) -> str | None:
    if old.metrics is None or new.metrics is None:
        return None
    name = old.metrics.primary
    if slack is None:
        limits = [c.limit for c in new.checks if c.name.endswith("_drop")]
        slack = limits[0] if limits else DEFAULT_METRIC_SLACK
    before, after = old.metrics.engine[name], new.metrics.engine[name]
    worse = (before - after) if old.metrics.higher_is_better else (after - before)
    if not math.isfinite(after) or worse > slack:
        return f"{key}/{task}: {name} {after:.3f} vs baseline {before:.3f} (worse by {worse:.3f} > {slack})"
    return None


def compare_with_baseline(report: Report, baseline: Report, metric_slack: dict[str, float] | None = None,
                          allow_other_model: bool = False, where: str = "the baseline") -> GateResult:
    """Regressions of `report` against `baseline`.

    A baseline of another model (see `identity_mismatch`) does not apply: the result says so and
    does not pass, unless `allow_other_model` (then tasks are compared by name). `metric_slack`
    maps an engine key (e.g. 'openvino-int8') to how many points its primary task metrics may
    lose; the default is each check's own metric-drop limit. A baseline holding a non-finite number is
    refused (ExportError naming `where`); a non-finite number in `report` is a regression.
    """
    refuse_non_finite(baseline, where)
    gate = GateResult(mismatch=identity_mismatch(report, baseline, allow_other_model))
    gate.other_model_only = bool(gate.mismatch) and not identity_mismatch(report, baseline, True)
    if gate.mismatch:
        return gate
    for stored in baseline.engines:
        engine = report.engine(stored.key)
        if engine is None:
            gate.regressions.append(f"{stored.key}: in the baseline but not built now")
            continue
        for task, old in stored.tasks.items():
            new = engine.tasks.get(task)
            if new is None:
                gate.regressions.append(f"{stored.key}/{task}: task missing from the new report")
                continue
            gate.compared += 1
            problem = _metric_regression(stored.key, task, old, new, (metric_slack or {}).get(stored.key))
            if problem:
                gate.regressions.append(problem)
            for name, slack in BASELINE_SLACK.items():
                before, after = old.value(name), new.value(name)
                if before is None or after is None:
                    continue
                worse = (after - before) if name in HIGHER_IS_WORSE else (before - after)
                if not math.isfinite(after) or worse > slack:
                    gate.regressions.append(f"{stored.key}/{task}: {name} {after:.4f} vs baseline {before:.4f} "
                                            f"(worse by {worse:.4f} > {slack})")
    if gate.compared == 0 and not gate.regressions:
        gate.mismatch = "the baseline holds no engine task results, so nothing was compared"
    return gate
