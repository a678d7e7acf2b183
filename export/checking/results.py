"""Check results as typed objects: what `accuracy` measures and what reports, the HTML page,
the baseline gate and the benchmark read. `to_dict` / `from_dict` only at the file boundary
(report.json keeps its format, so stored baselines stay readable)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.errors import ExportError
from mtlora_base.numbers import is_integer, is_number

REPORT_FORMAT = "mtlora-export/report/1"


# --------------------------------------------------------------------------- reading fields back strictly
#
# A report is also a baseline that gates CI, so a field of the wrong type is refused rather than coerced:
# float("inf") of a string, int(-3) of a count and bool("yes") would all read back as a verdict nobody made.

class FieldError(ValueError):
    """A report field that is missing or of the wrong type or range; `field` is its path in the file."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


@contextlib.contextmanager
def _within(prefix: str) -> Iterator[None]:
    """Prefix the path of a field error raised inside with `prefix` ('engines[0]', 'tasks.semseg')."""
    try:
        yield
    except FieldError as err:
        raise FieldError(f"{prefix}.{err.field}" if err.field else prefix, err.problem) from None
    except KeyError as err:
        raise FieldError(f"{prefix}.{err.args[0]}", "is missing") from None


_REQUIRED = object()


def _get(d, key: str, default):
    if not isinstance(d, dict):
        raise FieldError("", f"is {_shown(d)}, not an object")  # `_within` names it
    if default is _REQUIRED and key not in d:
        raise FieldError(key, "is missing")
    return d.get(key, default)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(d, key: str, default=_REQUIRED, finite: bool = False, optional: bool = False) -> float | None:
    """A number (NaN and the infinities are what a failing measurement can hold, unless `finite`)."""
    value = _get(d, key, default)
    if value is None and optional:
        return None
    if not is_number(value):
        raise FieldError(key, f"is {_shown(value)}, not a number")
    if finite and not math.isfinite(value):
        raise FieldError(key, f"is {value}, not a finite number")
    return float(value)


def _count(d, key: str, default=_REQUIRED, optional: bool = False) -> int | None:
    value = _get(d, key, default)
    if value is None and optional:
        return None
    if not is_integer(value) or value < 0:
        raise FieldError(key, f"is {_shown(value)}, not a non-negative integer")
    return value


def _flag(d, key: str, default=_REQUIRED) -> bool:
    value = _get(d, key, default)
    if not isinstance(value, bool):
        raise FieldError(key, f"is {_shown(value)}, not true or false")
    return value


def _text(d, key: str, default=_REQUIRED) -> str:
    value = _get(d, key, default)
    if not isinstance(value, str):
        raise FieldError(key, f"is {_shown(value)}, not text")
    return value


def _items(d, key: str, default=_REQUIRED, optional: bool = False) -> list:
    value = _get(d, key, default)
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise FieldError(key, f"is {_shown(value)}, not a list")
    return value


def _mapping(d, key: str, default=_REQUIRED, optional: bool = False) -> dict:
    value = _get(d, key, default)
    if value is None and optional:
        return {}
    return _object(value, key)


def _object(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise FieldError(field, f"is {_shown(value)}, not an object")
    return value


def _ignored_flag(d, key: str) -> None:
    """A verdict the file states but that is recomputed on reading ('passed'): still true or false."""
    if key in d:
        _flag(d, key)


@dataclass(frozen=True)
class Check:
    """One limit applied to one measurement; `passed` is False for a non-finite value."""

    name: str
    value: float
    limit: float
    op: str  # "<=" or ">="

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def describe(self) -> str:
        return f"{self.name} = {self.value:.4g}, limit {self.op} {self.limit}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "op": self.op, "passed": self.passed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Check:
        op = _text(d, "op")
        if op not in ("<=", ">="):
            raise FieldError("op", f"is {_shown(op)}, not '<=' or '>='")
        _ignored_flag(d, "passed")
        return cls(_text(d, "name"), _number(d, "value"), _number(d, "limit"), op)


@dataclass(frozen=True)
class TensorAgreement:
    max_abs: float
    mean_abs: float
    cosine: float
    non_finite: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "mean_abs": self.mean_abs, "cosine": self.cosine,
                "non_finite": self.non_finite}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorAgreement:
        return cls(_number(d, "max_abs"), _number(d, "mean_abs"), _number(d, "cosine"), _count(d, "non_finite", 0))


@dataclass(frozen=True)
class MetricComparison:
    """The task's metrics against labels, for the engine and for the PyTorch reference."""

    primary: str
    higher_is_better: bool
    engine: dict[str, float]
    reference: dict[str, float]

    @property
    def drop(self) -> float:
        """How much worse the engine is on the primary metric (positive = worse)."""
        delta = self.reference[self.primary] - self.engine[self.primary]
        return delta if self.higher_is_better else -delta

    def to_dict(self) -> dict[str, Any]:
        return {"primary": self.primary, "higher_is_better": self.higher_is_better, "engine": self.engine,
                "reference": self.reference, "drop": self.drop}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricComparison:
        engine, reference = _mapping(d, "engine"), _mapping(d, "reference")
        with _within("engine"):
            engine = {k: _number(engine, k) for k in engine}
        with _within("reference"):
            reference = {k: _number(reference, k) for k in reference}
        comparison = cls(_text(d, "primary"), _flag(d, "higher_is_better"), engine, reference)
        if comparison.primary not in engine or comparison.primary not in reference:
            raise FieldError("primary", f"is {_shown(comparison.primary)}, which engine and reference lack")
        if "drop" in d:  # recomputed from engine and reference, so only a drop they cannot give is refused
            drop = _number(d, "drop")
            if not math.isfinite(drop) and math.isfinite(comparison.drop):
                raise FieldError("drop", f"is {drop}, but engine and reference are finite "
                                         f"(a drop of {comparison.drop:.4g})")
        return comparison


DEFAULT_LIMITS = "defaults"  # `Judgement.limits` when no tolerance file entry applied


@dataclass(frozen=True)
class Judgement:
    """Whose limits judged one task of one engine (`export.checking.tolerances.Tolerances.judge`).

    precision_asked: the precision asked for on the task's path; precision_ran: what the backend reports
    ran there ('' when unknown); precision_judged: the precision whose default limits apply (the looser of
    asked and ran, never tighter than asked); limits: "defaults", or the tolerance file whose entry
    applied; limits_precision: the precision of that entry (precision_judged with the defaults)."""

    precision_asked: str
    precision_ran: str
    precision_judged: str
    limits: str = DEFAULT_LIMITS
    limits_precision: str = ""

    @property
    def from_file(self) -> bool:
        return self.limits != DEFAULT_LIMITS

    def describe(self, short: bool = False) -> str:
        """'fp16 asked, bf16 ran, bf16 defaults'; with a file entry, 'fp16 limits of tol.json' (`short`:
        the file's name only), with the defaults it sits on when they are another precision's."""
        head = f"{self.precision_asked} asked, {self.precision_ran or '?'} ran, "
        if not self.from_file:
            return head + f"{self.precision_judged} defaults"
        where = Path(self.limits).name if short else self.limits
        over = f" over {self.precision_judged} defaults" if self.limits_precision != self.precision_judged else ""
        return head + f"{self.limits_precision} limits of {where}{over}"

    def to_dict(self) -> dict[str, Any]:
        return {"precision_asked": self.precision_asked, "precision_ran": self.precision_ran,
                "precision_judged": self.precision_judged, "limits": self.limits,
                "limits_precision": self.limits_precision or self.precision_judged}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Judgement:
        return cls(_text(d, "precision_asked"), _text(d, "precision_ran", ""), _text(d, "precision_judged"),
                   _text(d, "limits", DEFAULT_LIMITS), _text(d, "limits_precision", ""))


@dataclass(frozen=True)
class TaskResult:
    """Everything measured and judged for one task of one engine."""

    task: str
    tensor: TensorAgreement
    agreement: float | None = None  # fraction of pixels with the reference's class / binarised value
    angle_deg: float | None = None  # mean angle between engine and reference normals
    metrics: MetricComparison | None = None
    checks: tuple[Check, ...] = ()
    judged: Judgement | None = None  # whose limits the checks are (None in reports of older versions)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def value(self, name: str) -> float | None:
        """A measurement by the name checks and baselines use (tensor ones included)."""
        if name == "argmax_agreement":
            return self.agreement
        if name == "angle_deg":
            return self.angle_deg
        return getattr(self.tensor, name, None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tensor": self.tensor.to_dict(), "checks": [c.to_dict() for c in self.checks]}
        if self.agreement is not None:
            out["argmax_agreement"] = self.agreement
        if self.angle_deg is not None:
            out["angle_deg"] = self.angle_deg
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_dict()
        if self.judged is not None:
            out["judged"] = self.judged.to_dict()
        return out

    @classmethod
    def from_dict(cls, task: str, d: dict[str, Any]) -> TaskResult:
        tensor = _mapping(d, "tensor")
        with _within("tensor"):
            tensor = TensorAgreement.from_dict(tensor)
        metrics = judged = None
        if d.get("metrics"):
            metrics = _mapping(d, "metrics")
            with _within("metrics"):
                metrics = MetricComparison.from_dict(metrics)
        checks = []
        for i, c in enumerate(_items(d, "checks", [])):
            with _within(f"checks[{i}]"):
                checks.append(Check.from_dict(c))
        if d.get("judged"):
            judged = _mapping(d, "judged")
            with _within("judged"):
                judged = Judgement.from_dict(judged)
        return cls(task, tensor, _number(d, "argmax_agreement", None, optional=True),
                   _number(d, "angle_deg", None, optional=True), metrics, tuple(checks), judged)


@dataclass(frozen=True)
class EngineInfo:
    """Which engine was checked: backend, the precision asked for and the one that ran, where it lives."""

    backend: str
    precision_requested: str
    precision_executed: str = ""
    device: str = ""
    files: dict[str, str] = field(default_factory=dict)
    directory: str = ""
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision_requested}"

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision_requested": self.precision_requested,
                "precision_executed": self.precision_executed, "device": self.device, "files": dict(self.files),
                "directory": self.directory, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineInfo:
        files, notes = _mapping(d, "files", {}), _items(d, "notes", [])
        with _within("files"):
            files = {k: _text(files, k) for k in files}
        for i, note in enumerate(notes):
            if not isinstance(note, str):
                raise FieldError(f"notes[{i}]", f"is {_shown(note)}, not text")
        return cls(_text(d, "backend"), _text(d, "precision_requested"), _text(d, "precision_executed", ""),
                   _text(d, "device", ""), files, _text(d, "directory", ""), tuple(notes))


@dataclass(frozen=True)
class EngineCheck:
    """The verdict for one engine; its truth value is whether every check passed."""

    engine: EngineInfo
    samples: int
    labelled: bool
    reference_source: str
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.engine.key

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tasks.values())

    def __bool__(self) -> bool:
        return self.passed

    @property
    def judged(self) -> list[tuple[Judgement, tuple[str, ...]]]:
        """Whose limits judged this engine: each distinct judgement with its tasks, in task order."""
        groups: dict[Judgement, list[str]] = {}
        for task, result in self.tasks.items():
            if result.judged is not None:
                groups.setdefault(result.judged, []).append(task)
        return [(j, tuple(tasks)) for j, tasks in groups.items()]

    def describe_judged(self, short: bool = False) -> str:
        """One line: 'fp16 asked, bf16 ran, bf16 defaults', per task where the tasks differ ('' when unknown)."""
        groups = self.judged
        if len(groups) == 1 and len(groups[0][1]) == len(self.tasks):
            return groups[0][0].describe(short)
        return "; ".join(f"{', '.join(tasks)}: {j.describe(short)}" for j, tasks in groups)

    def to_dict(self) -> dict[str, Any]:
        out = {"engine": self.engine.to_dict(), "samples": self.samples, "labelled": self.labelled,
               "reference": self.reference_source, "passed": self.passed,
               "tasks": {t: r.to_dict() for t, r in self.tasks.items()}}
        if self.judged:  # per engine, for people reading the JSON; the tasks' own entries are what is read back,
            # sorted, as the JSON's task keys are: a report read back gives the same dict
            out["judged"] = sorted(({**j.to_dict(), "tasks": sorted(tasks)} for j, tasks in self.judged),
                                   key=lambda group: group["tasks"])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineCheck:
        info = _mapping(d, "engine")
        with _within("engine"):
            info = EngineInfo.from_dict(info)
        tasks = {}
        for task, result in _mapping(d, "tasks").items():
            with _within(f"tasks.{task}"):
                tasks[task] = TaskResult.from_dict(task, result)
        _ignored_flag(d, "passed")
        return cls(info, _count(d, "samples"), _flag(d, "labelled"), _text(d, "reference"), tasks)


@dataclass(frozen=True)
class FallbackTask:
    """A task that failed its gate at int8: the check that failed, before the fallback and after it."""

    task: str
    check: str
    limit: float
    op: str
    before: float
    after: float | None = None  # None when no engine with layers in fp32 was checked

    def describe(self) -> str:
        after = "" if self.after is None else f" -> {self.after:.4g}"
        return f"{self.task} {self.check} {self.before:.4g}{after} (limit {self.op} {self.limit:g})"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "check": self.check, "limit": self.limit, "op": self.op, "before": self.before,
                "after": self.after}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FallbackTask:
        return cls(_text(d, "task"), _text(d, "check"), _number(d, "limit"), _text(d, "op"), _number(d, "before"),
                   _number(d, "after", None, optional=True))


@dataclass(frozen=True)
class FallbackLayer:
    """One layer the fallback search kept in fp32, and what it bought: the check of the task it helped
    most, measured before and after the layer went back to float (on the search's int8 graph)."""

    node: str
    role: str  # the graph it is in: "model", "backbone" or "head_<task>"
    task: str
    check: str
    before: float
    after: float
    local_error: float  # its relative output error from quantization, which ranked it

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "role": self.role, "task": self.task, "check": self.check, "before": self.before,
                "after": self.after, "local_error": self.local_error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FallbackLayer:
        return cls(_text(d, "node"), _text(d, "role"), _text(d, "task"), _text(d, "check"), _number(d, "before"),
                   _number(d, "after"), _number(d, "local_error"))


# What a fallback search ended with.
FALLBACK_VERDICTS = {
    "fixed": "every task passes with these layers in fp32",
    "not faster": "every task passes, but the engine is no faster than the 16-bit one here",
    "stopped": "stopped: int8 is no faster than the 16-bit engine here, so fp32 layers cannot pay off",
    "failed": "no set of layers in fp32 made every task pass within the search's limits",
}


@dataclass(frozen=True)
class Fallback:
    """The accuracy-aware fallback (int8 or 16-bit) of one engine set: what failed, what went back to fp32, at what speed."""

    engine: str  # the engine set's key, e.g. "onnxruntime-int8"
    verdict: str  # a key of FALLBACK_VERDICTS
    message: str  # one line for people
    tasks: tuple[FallbackTask, ...] = ()
    layers: tuple[FallbackLayer, ...] = ()
    latency_ms: dict[str, float] = field(default_factory=dict)  # "int8", "int8+fallback", the 16-bit ones
    probes: int = 0  # int8 graph variants judged on the evaluation set
    seconds: float = 0.0
    cached: bool = False  # the layer list came from the calibration cache
    file: str = ""  # where the list is saved for --keep-fp32 @FILE

    @property
    def passed(self) -> bool:
        return self.verdict in ("fixed", "not faster")

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "verdict": self.verdict, "message": self.message,
                "tasks": [t.to_dict() for t in self.tasks], "layers": [layer.to_dict() for layer in self.layers],
                "latency_ms": dict(self.latency_ms), "probes": self.probes, "seconds": self.seconds,
                "cached": self.cached, "file": self.file}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fallback:
        tasks, layers = [], []
        for i, t in enumerate(_items(d, "tasks", [])):
            with _within(f"tasks[{i}]"):
                tasks.append(FallbackTask.from_dict(t))
        for i, layer in enumerate(_items(d, "layers", [])):
            with _within(f"layers[{i}]"):
                layers.append(FallbackLayer.from_dict(layer))
        latency = _mapping(d, "latency_ms", None, optional=True)
        with _within("latency_ms"):
            latency = {k: _number(latency, k, finite=True) for k in latency}
        return cls(_text(d, "engine"), _text(d, "verdict"), _text(d, "message", ""), tuple(tasks), tuple(layers),
                   latency, _count(d, "probes", 0), _number(d, "seconds", 0.0, finite=True),
                   _flag(d, "cached", False), _text(d, "file", ""))


@dataclass(frozen=True)
class Candidate:
    """One engine `--precision auto` built, checked and timed."""

    name: str  # "fp32", "fp16", "bf16", "int8", "int8+fallback"
    check: EngineCheck
    latency_ms: float | None = None  # median per call at the timing batch; None when it was not timed
    size_bytes: int = 0
    chosen: bool = False
    note: str = ""

    @property
    def backend(self) -> str:
        return self.check.engine.backend

    @property
    def passed(self) -> bool:
        return self.check.passed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "check": self.check.to_dict(), "latency_ms": self.latency_ms,
                "size_bytes": self.size_bytes, "chosen": self.chosen, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        check = _mapping(d, "check")
        with _within("check"):
            check = EngineCheck.from_dict(check)
        return cls(_text(d, "name"), check, _number(d, "latency_ms", None, finite=True, optional=True),
                   _count(d, "size_bytes", 0), _flag(d, "chosen", False), _text(d, "note", ""))


@dataclass(frozen=True)
class AutoSelection:
    """What `--precision auto` compared and on what machine: every candidate, and how they were timed."""

    candidates: tuple[Candidate, ...]
    batch: int = 1
    runs: int = 0  # timed calls per candidate (the median is reported)
    threads: int | None = None
    cpu: str = ""
    cpu_flags: dict[str, bool] = field(default_factory=dict)

    def chosen(self, backend: str) -> Candidate | None:
        return next((c for c in self.candidates if c.chosen and c.backend == backend), None)

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": [c.to_dict() for c in self.candidates], "batch": self.batch, "runs": self.runs,
                "threads": self.threads, "cpu": self.cpu, "cpu_flags": dict(self.cpu_flags)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoSelection:
        candidates = []
        for i, c in enumerate(_items(d, "candidates")):
            with _within(f"candidates[{i}]"):
                candidates.append(Candidate.from_dict(c))
        flags = _mapping(d, "cpu_flags", None, optional=True)
        with _within("cpu_flags"):
            flags = {k: _flag(flags, k) for k in flags}
        return cls(tuple(candidates), _count(d, "batch", 1), _count(d, "runs", 0),
                   _count(d, "threads", None, optional=True), _text(d, "cpu", ""), flags)


@dataclass
class Report:
    """Every engine's check, with what model they were checked for.

    `model` holds the model's interface and where it came from, and `identity` what identifies the
    model (tasks, channels, and the digest of the checkpoint or exported graphs), which a baseline
    comparison uses to refuse comparing different models.
    """

    model: dict[str, Any]
    engines: list[EngineCheck]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    identity: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[Fallback] = field(default_factory=list)  # accuracy-aware fallback (int8 or 16-bit), per engine set
    auto: AutoSelection | None = None  # what --precision auto compared
    notes: list[str] = field(default_factory=list)  # one-line findings, e.g. a precision slower than another

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.engines)

    @property
    def tasks(self) -> list[str]:
        return list(self.model.get("tasks", []))

    def engine(self, key: str) -> EngineCheck | None:
        return next((e for e in self.engines if e.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        out = {"format": REPORT_FORMAT, "created": self.created, "model": self.model,
               "engines": [e.to_dict() for e in self.engines], "passed": self.passed}
        if self.identity:
            out["identity"] = self.identity
        if self.fallbacks:
            out["fallbacks"] = [f.to_dict() for f in self.fallbacks]
        if self.auto is not None:
            out["auto"] = self.auto.to_dict()
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Report:
        """A report read back from JSON; a file of the right format with missing or malformed fields is
        one ExportError naming the field, never a KeyError."""
        if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT:
            raise ExportError(f"{where}: not an mtlora-export accuracy report (format {REPORT_FORMAT})")
        try:
            engines, fallbacks = [], []
            for i, e in enumerate(_items(d, "engines")):
                with _within(f"engines[{i}]"):
                    engines.append(EngineCheck.from_dict(e))
            for i, f in enumerate(_items(d, "fallbacks", None, optional=True)):
                with _within(f"fallbacks[{i}]"):
                    fallbacks.append(Fallback.from_dict(f))
            auto = None
            if d.get("auto"):
                with _within("auto"):
                    auto = AutoSelection.from_dict(d["auto"])
            notes = _items(d, "notes", None, optional=True)
            for i, note in enumerate(notes):
                if not isinstance(note, str):
                    raise FieldError(f"notes[{i}]", f"is {_shown(note)}, not text")
            identity = _mapping(d, "identity", None, optional=True)
            evaluation = identity.get("evaluation_data")
            if evaluation is not None:
                with _within("identity"):
                    evaluation = _mapping(identity, "evaluation_data")
                with _within("identity.evaluation_data"):
                    _count(evaluation, "samples", None, optional=True)
            _ignored_flag(d, "passed")
            return cls(dict(_mapping(d, "model", None, optional=True)), engines, _text(d, "created", ""), dict(identity),
                       fallbacks, auto, list(notes))
        except FieldError as err:
            raise ExportError(f"{where}: the report's field {err.field} {err.problem}; regenerate it with "
                              "'mtlora-export build' or 'check'") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            what = f"lacks {err}" if isinstance(err, KeyError) else f"is malformed ({err})"
            raise ExportError(f"{where}: the report {what}; regenerate it with 'mtlora-export build' or "
                              "'check'") from None
