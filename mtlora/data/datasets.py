"""Torch glue: build a data set by name and hand out dicts of tensors.

`build_dataset("synthetic" | "pascal" | "nyud", ...)` wraps a numpy loader
and a transform from `mtlora.data.transforms`; items are
`{"image": (3, H, W) float32, <task>: label tensor, "meta": {...}}` in the
layouts `transforms` documents. Use `collate` with a DataLoader so `meta`
stays a list of dicts instead of being split into columns.

Augmentation randomness is a pure function of `(seed, epoch, index)`, so
results do not depend on worker count or order; call `set_epoch` each epoch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mtlora.data import nyud, pascal
from mtlora.data.synthetic import SYNTHETIC_TASKS, SyntheticMultiTask
from mtlora.data.transforms import (
    NYUD_AUGMENTATION,
    PASCAL_AUGMENTATION,
    Augmentation,
    TrainTransform,
    ValTransform,
)
from mtlora.errors import ConfigError

DATASET_NAMES = ("synthetic", "pascal", "nyud")
# Poses, sizes and positions already vary in every rendered scene; flips are enough.
SYNTHETIC_AUGMENTATION = Augmentation(scale_range=(1.0, 1.0), rotation_range=(0.0, 0.0))
_DEFAULT_SYNTHETIC_SAMPLES = {"train": 2000, "val": 200, "test": 200}


def dataset_tasks(name: str, root: str | os.PathLike | None = None) -> dict[str, int]:
    """task -> output channels for a data set; with `root`, only the tasks present on disk."""
    if name == "synthetic":
        return dict(SYNTHETIC_TASKS)
    if name == "pascal":
        return pascal.available_tasks(os.fspath(root)) if root is not None else dict(pascal.PASCAL_TASKS)
    if name == "nyud":
        return nyud.available_tasks(os.fspath(root)) if root is not None else dict(nyud.NYUD_TASKS)
    raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or any(not isinstance(s, int) or s <= 0 for s in size):
        raise ConfigError(f"size must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


class MultiTaskDataset(Dataset):
    """A numpy multi-task source plus its transform, yielding dicts of tensors."""

    def __init__(self, source, transform, train: bool, seed: int = 0):
        self.source = source
        self.transform = transform
        self.train = train
        self.seed = seed
        self.epoch = 0

    @property
    def tasks(self) -> list[str]:
        return list(self.source.tasks)

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh augmentations for a new epoch (deterministically)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        sample = self.source[index]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            sample = self.transform(sample, rng)
        else:
            sample = self.transform(sample)
        return {key: value if key == "meta" else torch.from_numpy(value) for key, value in sample.items()}


def collate(batch: Sequence[dict]) -> dict:
    """Stack tensors along a new batch axis; `meta` becomes a list of per-sample dicts."""
    out = {key: torch.stack([item[key] for item in batch]) for key in batch[0] if key != "meta"}
    if "meta" in batch[0]:
        out["meta"] = [item["meta"] for item in batch]
    return out


def build_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str,
    tasks: Sequence[str] | None,
    size: int | Sequence[int],
    train: bool,
    *,
    seed: int = 0,
    num_samples: int | None = None,
    augmentation: Augmentation | None = None,
) -> MultiTaskDataset:
    """A torch Dataset of model-ready samples.

    `size` is the model input (h, w) (an int for square). `train=True` applies
    random augmentation (the data set's official recipe unless `augmentation`
    is given); otherwise only resize and normalise. For "synthetic", `root` is
    unused, `seed` also picks the scenes and `num_samples` sets the length;
    scenes are rendered directly at the model size.
    """
    size = _as_size(size)
    if name == "synthetic":
        count = num_samples if num_samples is not None else _DEFAULT_SYNTHETIC_SAMPLES.get(split, 200)
        source = SyntheticMultiTask(split=split, num_samples=count, size=max(size), seed=seed, tasks=tasks)
        default_augmentation = SYNTHETIC_AUGMENTATION
    elif name in ("pascal", "nyud"):
        if root is None:
            raise ConfigError(f"data set {name!r} needs a data root (the extracted folder)")
        if num_samples is not None:
            raise ConfigError(f"num_samples only applies to the synthetic data set, not {name!r}")
        if name == "pascal":
            source = pascal.PascalContextMT(root, split=split, tasks=tasks)
            default_augmentation = PASCAL_AUGMENTATION
        else:
            source = nyud.NYUDMT(root, split=split, tasks=tasks)
            default_augmentation = NYUD_AUGMENTATION
    else:
        raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if train:
        transform = TrainTransform(size, augmentation or default_augmentation)
    else:
        transform = ValTransform(size)
    return MultiTaskDataset(source, transform, train=train, seed=seed)
