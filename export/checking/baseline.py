"""The CI regression gate: compare a new report with a stored baseline, task by task.

A task metric that got worse by more than its tolerance, or an agreement /
angle / cosine that moved against the baseline by more than a small slack, is a
regression. An engine or task the baseline has and the new report lacks is one
too, so a gate can never pass by building less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from export.checking.results import Report, TaskResult

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

    @property
    def applies(self) -> bool:
        return not self.mismatch and self.compared > 0

    @property
    def passed(self) -> bool:
        return self.applies and not self.regressions


def identity_mismatch(report: Report, baseline: Report) -> str:
    """Why `baseline` was made from another model than `report` ('' when it was the same model).

    A model is its tasks, their output channels, its input size and its weights (the source
    checkpoint's SHA-256, which every export records)."""
    new, old = report.identity, baseline.identity
    if not old:
        return "the baseline does not say which model it was made from (written by an older version)"
    if not new:
        return "the new report does not say which model it was made from"
    for key, what in (("tasks", "tasks"), ("output_channels", "output channels per task"),
                      ("input_size", "input size")):
        if new.get(key) != old.get(key):
            return f"other {what}: {new.get(key)} now, {old.get(key)} in the baseline"
    if new.get("source_sha256") != old.get("source_sha256"):
        return (f"other weights: checkpoint SHA-256 {str(new.get('source_sha256'))[:12]} now, "
                f"{str(old.get('source_sha256'))[:12]} in the baseline")
    return ""


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
                          allow_other_model: bool = False) -> GateResult:
    """Regressions of `report` against `baseline`.

    A baseline of another model (see `identity_mismatch`) does not apply: the result says so and
    does not pass, unless `allow_other_model` (then tasks are compared by name). `metric_slack`
    maps an engine key (e.g. 'openvino-int8') to how many points its primary task metrics may
    lose; the default is each check's own metric-drop limit.
    """
    gate = GateResult(mismatch="" if allow_other_model else identity_mismatch(report, baseline))
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
