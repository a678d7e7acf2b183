"""Check results as typed objects: what `accuracy` measures and what reports, the HTML page,
the baseline gate and the benchmark read. `to_dict` / `from_dict` only at the file boundary
(report.json keeps its format, so stored baselines stay readable)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from export.errors import ExportError

REPORT_FORMAT = "mtlora-export/report/1"


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
        return cls(str(d["name"]), float(d["value"]), float(d["limit"]), str(d["op"]))


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
        return cls(float(d["max_abs"]), float(d["mean_abs"]), float(d["cosine"]), int(d.get("non_finite", 0)))


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
        return cls(str(d["primary"]), bool(d["higher_is_better"]),
                   {k: float(v) for k, v in d["engine"].items()}, {k: float(v) for k, v in d["reference"].items()})


@dataclass(frozen=True)
class TaskResult:
    """Everything measured and judged for one task of one engine."""

    task: str
    tensor: TensorAgreement
    agreement: float | None = None  # fraction of pixels with the reference's class / binarised value
    angle_deg: float | None = None  # mean angle between engine and reference normals
    metrics: MetricComparison | None = None
    checks: tuple[Check, ...] = ()

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
        return out

    @classmethod
    def from_dict(cls, task: str, d: dict[str, Any]) -> TaskResult:
        return cls(task, TensorAgreement.from_dict(d["tensor"]),
                   None if d.get("argmax_agreement") is None else float(d["argmax_agreement"]),
                   None if d.get("angle_deg") is None else float(d["angle_deg"]),
                   MetricComparison.from_dict(d["metrics"]) if d.get("metrics") else None,
                   tuple(Check.from_dict(c) for c in d.get("checks", [])))


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
        return cls(str(d["backend"]), str(d["precision_requested"]), str(d.get("precision_executed", "")),
                   str(d.get("device", "")), dict(d.get("files", {})), str(d.get("directory", "")),
                   tuple(d.get("notes", ())))


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

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.to_dict(), "samples": self.samples, "labelled": self.labelled,
                "reference": self.reference_source, "passed": self.passed,
                "tasks": {t: r.to_dict() for t, r in self.tasks.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineCheck:
        return cls(EngineInfo.from_dict(d["engine"]), int(d["samples"]), bool(d["labelled"]), str(d["reference"]),
                   {t: TaskResult.from_dict(t, r) for t, r in d["tasks"].items()})


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
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Report:
        """A report read back from JSON; a file of the right format with missing or malformed fields is
        one ExportError naming the field, never a KeyError."""
        if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT:
            raise ExportError(f"{where}: not an mtlora-export accuracy report (format {REPORT_FORMAT})")
        try:
            engines = d["engines"]
            if not isinstance(engines, list):
                raise TypeError("'engines' is not a list")
            return cls(dict(d.get("model") or {}), [EngineCheck.from_dict(e) for e in engines],
                       str(d.get("created", "")), dict(d.get("identity") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            what = f"lacks {err}" if isinstance(err, KeyError) else f"is malformed ({err})"
            raise ExportError(f"{where}: the report {what}; regenerate it with 'mtlora-export build' or "
                              "'check'") from None
