"""The learning rate: the official peak (linear scaling by batch) and its warm-up and cosine schedule,
applied one step behind as the official loop applies it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtlora.train.config import TrainConfig


# The official schedule, in units of the official reference batch of 512.
OFFICIAL_BASE_LR = 5e-4
OFFICIAL_WARMUP_LR = 5e-7
OFFICIAL_MIN_LR = 5e-6
LR_REFERENCE_BATCH = 512


@dataclass(frozen=True)
class WarmupCosine:
    """Per-step learning rate: linear warm-up, then half a cosine (timm's CosineLRScheduler, warmup_prefix).

    `rate(step)` is the schedule itself; `applied(step)` is the rate the official loop has in the optimiser at
    its optimiser step `step` (0-based). That loop calls timm's `step_update(k)` *after* step k, so step k runs
    with rate(k - 1), and steps 0 and 1 both run with the warm-up start; we do the same. With accumulation and
    an epoch whose batches are no multiple of the steps, upstream's k is (epoch * batches + batch) // steps, which
    skips ahead at each epoch's end: `update_index` reproduces it.
    """

    peak_lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def official(cls, peak_lr: float, warmup_lr: float, min_lr: float, warmup_epochs: float, epochs: int,
                 steps_per_epoch: int) -> WarmupCosine:
        """Step counts as the official build_scheduler rounds them (down)."""
        return cls(peak_lr, warmup_lr, min_lr, int(warmup_epochs * steps_per_epoch), int(epochs * steps_per_epoch))

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + step * (self.peak_lr - self.warmup_lr) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    __call__ = rate

    def applied(self, step: int) -> float:
        return self.rate(max(step - 1, 0))

    @staticmethod
    def update_index(epoch: int, batch: int, batches_per_epoch: int, accumulation_steps: int) -> int:
        """Upstream's step_update argument after the step that closes `batch` (0-based) of `epoch` (0-based)."""
        return (epoch * batches_per_epoch + batch) // accumulation_steps


def peak_learning_rate(config: TrainConfig, world_size: int) -> float:
    """An explicit lr as given; else the official linear scaling, which also multiplies by the accumulation
    steps (main.py scales its base, warm-up and minimum rates alike; ours follow the peak as ratios)."""
    if config.lr is not None:
        return float(config.lr)
    return OFFICIAL_BASE_LR * config.batch_size * world_size * config.accumulation_steps / LR_REFERENCE_BATCH
