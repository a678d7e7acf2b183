"""The settings of a training run, everything but the model: `TrainConfig`, checked field by field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mtlora.data.datasets import DATASET_NAMES
from mtlora.errors import ConfigError
from mtlora.metrics import TASK_METRICS
from mtlora.train.schedule import OFFICIAL_BASE_LR, OFFICIAL_MIN_LR, OFFICIAL_WARMUP_LR
from mtlora_base.numbers import is_finite_number

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
# Upper bounds shared by the command line and a resumed training_state.json: past them a value is a typo, and
# torch fails on it with an unreadable error (a seed past 64 bits overflows, 10^5 threads cannot start oneDNN,
# 10^9 loader workers hang forking).
MAX_SEED = 2**32 - 1
MAX_WORKERS = 256
MAX_THREADS = 1024
MAX_SAMPLES = 10**8
MAX_WEIGHT_DECAY = 10.0
LIMITS = {"seed": MAX_SEED, "workers": MAX_WORKERS, "threads": MAX_THREADS, "train_samples": MAX_SAMPLES,
          "val_samples": MAX_SAMPLES, "steps_per_epoch": MAX_SAMPLES, "epochs": 10**6}


@dataclass
class TrainConfig:
    """Everything about a run except the model. The optimisation defaults are the official recipe
    (whose data set is PASCAL-Context; `data` defaults to the synthetic set, which needs no files).

    `batch_size` is per process. `accumulation_steps` sums the gradients of
    that many batches into one optimiser step, as the official
    TRAIN.ACCUMULATION_STEPS does. `lr` is the peak learning rate; None
    applies the official linear scaling 5e-4 x global batch / 512 x
    accumulation steps. Warm-up starts at
    lr x `warmup_lr_ratio` and the cosine ends at lr x `min_lr_ratio` (the
    official 5e-7 and 5e-6 relative to 5e-4). `steps_per_epoch` caps the
    batches of an epoch; `train_samples` / `val_samples` size the synthetic
    set. `save_every` / `eval_every` count epochs (0: only at the end).
    `workers` / `threads` (CPU threads per process) default to what the
    machine has: see `default_workers` and `default_threads`.
    """

    data: str = "synthetic"
    data_root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 300
    warmup_epochs: float = 20.0
    batch_size: int = 32
    lr: float | None = None
    warmup_lr_ratio: float = OFFICIAL_WARMUP_LR / OFFICIAL_BASE_LR
    min_lr_ratio: float = OFFICIAL_MIN_LR / OFFICIAL_BASE_LR
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    accumulation_steps: int = 1
    steps_per_epoch: int | None = None
    train_samples: int | None = None
    val_samples: int | None = None
    loss_weights: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, float] | None = None
    seed: int = 0
    workers: int | None = None
    threads: int | None = None
    eval_every: int = 5
    eval_initial: bool = False
    save_every: int = 20
    precision: str = "auto"
    device: str = "auto"
    pretrained: str | None = None
    slim: bool = False

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.data not in DATASET_NAMES:
            raise ConfigError(f"unknown data set {self.data!r}; choose one of {', '.join(DATASET_NAMES)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "accumulation_steps": self.accumulation_steps}
        for name, value in positive.items():
            if int(value) <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("steps_per_epoch", "train_samples", "val_samples"):
            value = getattr(self, name)
            if value is not None and int(value) <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("eval_every", "save_every", "seed"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ConfigError(f"{name} must be at most {limit}, got {value}")
        for name, table in (("loss_weights", self.loss_weights), ("baselines", self.baselines or {})):
            unknown = sorted(set(table) - set(TASK_METRICS))
            if unknown:
                raise ConfigError(f"{name} name unknown task(s) {', '.join(map(repr, unknown))}; "
                                  f"tasks are {', '.join(TASK_METRICS)}")
        bad = [f"loss_weights.{k} = {v}" for k, v in self.loss_weights.items() if not 0 <= v < math.inf]
        bad += [f"baselines.{k} = {v}" for k, v in (self.baselines or {}).items() if v == 0 or not math.isfinite(v)]
        if bad:
            raise ConfigError(f"{bad[0]}: loss weights must be finite and >= 0, baselines finite and non-zero "
                              "(Delta_m divides by them)")
        if self.loss_weights and not any(self.loss_weights.values()):
            raise ConfigError(f"loss_weights are all zero ({self.loss_weights}): nothing would be trained")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"warmup_epochs must lie in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay > MAX_WEIGHT_DECAY:
            raise ConfigError(f"weight_decay must be at most {MAX_WEIGHT_DECAY}, got {self.weight_decay}")
        if self.warmup_lr_ratio > 1 or self.min_lr_ratio > 1:
            raise ConfigError("warmup_lr_ratio and min_lr_ratio are fractions of lr: they must be at most 1, "
                              f"got {self.warmup_lr_ratio} and {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError("weight_decay and clip_grad must be >= 0 (clip_grad 0 turns clipping off)")
        if self.warmup_lr_ratio < 0 or self.min_lr_ratio < 0:
            raise ConfigError("warmup_lr_ratio and min_lr_ratio must be >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.data != "synthetic" and (self.train_samples is not None or self.val_samples is not None):
            raise ConfigError("train_samples / val_samples size the synthetic data set only; "
                              f"{self.data} uses its split files")
        if self.data != "synthetic" and self.data_root is None:
            raise ConfigError(f"data set {self.data!r} needs a data root (the extracted folder)")
        if self.data == "synthetic" and self.data_root is not None:
            raise ConfigError("the synthetic data set is generated; it takes no data root")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)


# What each annotation of TrainConfig accepts (JSON types: a saved run's settings come back through from_dict).
_ANNOTATION_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"),
    "int": ((int,), "a whole number"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "dict[str,float]": ((dict,), "an object of task: number"),
}


def _check_field_types(config: TrainConfig) -> None:
    """Every field has its annotated type and every number is finite, before any range check reads it."""
    for item in fields(config):
        value = getattr(config, item.name)
        spec = str(item.type).replace(" ", "")
        optional = spec.endswith("|None")
        accepted, words = _ANNOTATION_TYPES[spec[: -len("|None")] if optional else spec]
        if value is None and optional:
            continue
        # bool is an int to Python, but `epochs: true` is not a number of epochs.
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            raise ConfigError(f"{item.name} must be {words}{' or null' if optional else ''}, got {value!r}")
        numbers = value.values() if isinstance(value, dict) else [value] if accepted[-1] is float else []
        for number in numbers:
            if not is_finite_number(number):
                raise ConfigError(f"{item.name} must hold finite numbers, got {value!r}")
