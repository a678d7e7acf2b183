"""The multi-task trainer: the official MTLoRA recipe, checkpoints without pickle, one or many processes.

Recipe (scale-lab/MTLoRA `main.py`, `optimizer.py`, `lr_scheduler.py`, `config.py`):
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.05, none on biases and 1-D
tensors), a peak learning rate of 5e-4 scaled linearly by global batch / 512
(times the gradient accumulation steps), per-step linear warm-up from
lr * 1e-3 over 20 epochs then cosine decay to lr * 1e-2 over the rest of 300
epochs, applied one step late as the official loop applies it (`WarmupCosine`),
gradient clipping at 5.0 on the unscaled gradients, the official loss weights,
bf16 autocast on a CUDA GPU that has it, else fp16 autocast with a gradient
scaler (the official default).

A run directory `OUT` ends up as::

    OUT/model.safetensors, config.json, state.json   the final model (a checkpoint: load_checkpoint(OUT))
    OUT/metrics.jsonl                                one JSON record per epoch
    OUT/curves.png                                   losses and validation metrics
    OUT/best/                                        the best model by multi-task delta (or val loss)
    OUT/last/                                        model + optimizer state, for `--resume`

Every checkpoint directory is written beside its final name and renamed into
place, and the final OUT is assembled the same way, so a crash leaves the
previous complete version, never a truncated one.

Multi-process training: `torchrun --nproc-per-node N --no-python mtlora train
...` (or `train()` called in each process). Each process trains on its shard
(DistributedSampler) under DistributedDataParallel (NCCL on GPUs, gloo on
CPUs); rank 0 alone evaluates, logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from mtlora.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    commit_directory,
    load_into,
    load_weights,
    read_config,
    save_checkpoint,
    staging_dir,
    write_json_atomic,
)
from mtlora.config import ModelConfig
from mtlora.data.datasets import DATASET_NAMES, build_dataset, collate, dataset_tasks
from mtlora.errors import CheckpointError, ConfigError, DataError, MTLoRAError
from mtlora.evaluate import (
    default_baselines,
    evaluate,
    json_ready,
    primary_metrics,
    worker_error,
    worker_settings,
)
from mtlora.fileio import write_bytes_atomic
from mtlora.losses import MultiTaskLoss
from mtlora.metrics import TASK_METRICS
from mtlora.model import MultiTaskSwin

log = logging.getLogger("mtlora.train")

TRAINING_STATE_TENSORS = "training_state.safetensors"
TRAINING_STATE_JSON = "training_state.json"
TRAINING_STATE_FORMAT = "mtlora-train/1"
LAST_DIR = "last"
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# The official schedule, in units of the official reference batch of 512.
OFFICIAL_BASE_LR = 5e-4
OFFICIAL_WARMUP_LR = 5e-7
OFFICIAL_MIN_LR = 5e-6
LR_REFERENCE_BATCH = 512
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


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
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"warmup_epochs must lie in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
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
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ConfigError(f"{item.name} must hold finite numbers, got {value!r}")


@dataclass
class TrainResult:
    out: Path
    epochs: int
    steps: int
    seconds: float
    metrics: dict[str, Any] | None
    best: dict[str, Any] | None


# ----------------------------------------------------------------------------- processes and devices


@dataclass
class Distributed:
    """Where this process runs; `world_size` 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes (env://), or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _pick_device(device, local_rank)
    if world_size <= 1 and not dist.is_initialized():
        return Distributed(device=target)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend=backend, init_method="env://")
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, target, owns)


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: its autocast dtype (None: fp32), and whether the loss needs a gradient scaler.

    fp16's narrow range flushes small gradients to zero, so the official loop
    multiplies the loss by a running scale and divides it out before clipping
    (torch's GradScaler); bf16 has fp32's range and needs none.
    """

    name: str
    dtype: torch.dtype | None
    scaled: bool
    needs_cuda: bool
    validation: str  # what `evaluate` runs the validation in (it offers fp32 and bf16)

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(device.type) if self.scaled else None


PRECISION_MODES = {
    "fp32": Precision("fp32", None, scaled=False, needs_cuda=False, validation="fp32"),
    "bf16": Precision("bf16", torch.bfloat16, scaled=False, needs_cuda=False, validation="bf16"),
    "fp16": Precision("fp16", torch.float16, scaled=True, needs_cuda=True, validation="fp32"),
}


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The precision a run uses. 'auto' is bf16 on a CUDA GPU that has it, fp16 with a scaler (the official
    default) on one that does not, and fp32 on a CPU."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    mode = PRECISION_MODES[precision]
    if mode.needs_cuda and device.type != "cuda":
        raise ConfigError(f"--precision {precision} trains on a CUDA GPU only (autocast with a gradient scaler); "
                          "use bf16 or fp32 on a CPU")
    return mode


def seed_everything(seed: int, rank: int = 0, epoch: int = 0) -> None:
    """Seed every generator from (seed, rank, epoch): a resumed run draws what an unbroken one would."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    value = int(state[0]) << 32 | int(state[1])
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value % 2**63)


def _cores_per_process() -> int:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // max(local_world, 1))


def default_workers() -> int:
    """The official 4 loader workers, fewer when the cores are few (one is left to the model)."""
    return max(0, min(4, _cores_per_process() - 1))


def default_threads(workers: int) -> int:
    """CPU threads for the model: this process's share of the cores, less those its loader workers use.

    More threads than free cores is far worse than too few: OpenMP threads
    spin-wait for each other, and on two cores with one loader worker a
    two-thread model runs about ten times slower than a one-thread one.
    """
    return max(1, _cores_per_process() - workers)


# ----------------------------------------------------------------------------- optimiser and schedule


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # The official rule as main.py applies it: biases and 1-D tensors (norms, scales). Its optimizer.py also
    # skips Swin's `no_weight_decay` names (position-bias tables, absolute position embedding), but it asks the
    # multi-task wrapper, which does not forward them, so in the official runs those tables decay too.
    return param.ndim <= 1 or name.endswith(".bias")


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over the trainable parameters; returns it and the parameter names in optimiser order."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _no_decay(name, param):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return optimizer, decay_names + no_decay_names


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


def unused_parameters(model: MultiTaskSwin) -> list[str]:
    """Trainable parameters that get no gradient from a forward pass.

    With task streams, the shared stream of the last stage's last block feeds
    nothing (only the task streams leave it), so its shared LoRA is never
    used; DDP has to be told, or it waits for those gradients forever.
    """
    size = model.config.swin.img_size
    was_training = model.training
    model.eval()  # same graph, and BatchNorm statistics stay untouched by the probe
    device = next(model.parameters()).device
    outputs = model(torch.zeros(1, model.config.swin.in_chans, size, size, device=device))
    sum(o.float().sum() for o in outputs).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def average_buffers(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over the ranks, so every rank holds the same model.

    DDP copies rank 0's buffers at each forward; after the last step of an
    epoch the ranks would otherwise differ by the statistics of their own shard.
    """
    world_size = dist.get_world_size()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer /= world_size


class OptimizerStep:
    """Backward passes and optimiser steps as the official loop takes them (utils.NativeScalerWithGradNormCount).

    Gradients of `accumulation_steps` micro-batches are summed (each micro-batch's loss is not divided, as
    upstream does not divide it), then: unscale (fp16), clip the unscaled gradients' norm, step, update the
    scale, zero the gradients. With a scaler, a step whose gradients hold inf or NaN is skipped and the scale
    halved; the schedule moves on regardless, as upstream's does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], clip_grad: float,
                 accumulation_steps: int = 1, scaler: torch.amp.GradScaler | None = None):
        self.optimizer, self.parameters, self.clip_grad = optimizer, parameters, clip_grad
        self.accumulation_steps, self.scaler = accumulation_steps, scaler
        self.micro_batch = 0
        self.skipped = 0

    @property
    def closes_step(self) -> bool:
        """Whether the next micro-batch is the last one of an optimiser step (DDP syncs gradients only then)."""
        return (self.micro_batch + 1) % self.accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> float | None:
        """Accumulate one micro-batch's gradients; after the last of a step, take the step and return the
        gradient norm (before clipping, unscaled); otherwise None."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.micro_batch += 1
        if self.micro_batch % self.accumulation_steps:
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_grad if self.clip_grad > 0 else math.inf)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped += int(self.scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def reset(self) -> None:
        """Drop a partial accumulation (the official loop zeroes the gradients at each epoch's start)."""
        self.micro_batch = 0
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- checkpoints with optimiser state


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON, keyed by parameter name."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        name = names[index]
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "names": names}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: Mapping[str, torch.Tensor], meta: Mapping, source: str
) -> None:
    if list(meta.get("names", [])) != list(names):
        raise CheckpointError(
            f"{source}: the optimizer state belongs to another set of trainable parameters "
            "(a different adapter kind or model); start a new run instead of resuming"
        )
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        prefix, name, item = key.split("/", 2) if key.count("/") >= 2 else ("", "", "")
        if prefix != "optimizer" or name not in index:
            raise CheckpointError(f"{source}: unexpected optimizer tensor {key!r}")
        state.setdefault(index[name], {})[item] = value
    for name, values in meta.get("scalars", {}).items():
        if name not in index:
            raise CheckpointError(f"{source}: optimizer scalars for an unknown parameter {name!r}")
        state.setdefault(index[name], {}).update(values)
    groups = [dict(g) for g in meta["param_groups"]]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{source}: optimizer state does not fit ({err})") from None


def save_training_checkpoint(
    model: MultiTaskSwin,
    out: Path,
    extra_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    names: list[str] | None = None,
    training_state: dict[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """A checkpoint directory, optionally with the optimiser and trainer state beside the weights."""
    out = Path(out)
    building = staging_dir(out)
    try:
        # save_checkpoint is atomic on its own; we fill the directory it writes, then rename it in one step.
        target = building / "checkpoint"
        save_checkpoint(model, target, extra_state)
        if optimizer is not None:
            tensors, meta = optimizer_state_tensors(optimizer, names or [])
            save_file(tensors, str(target / TRAINING_STATE_TENSORS), metadata={"format": TRAINING_STATE_FORMAT})
            state = {"format": TRAINING_STATE_FORMAT, "optimizer": meta, **(training_state or {})}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            write_json_atomic(target / TRAINING_STATE_JSON, state)
        commit_directory(target, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out


def resolve_resume_dir(path: str | Path) -> Path:
    """A checkpoint with training state: the directory itself, or the `last/` of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint to resume from")
    for candidate in (path, path / LAST_DIR):
        if (candidate / TRAINING_STATE_JSON).is_file():
            return candidate
    raise CheckpointError(
        f"{path}: has no training state ({TRAINING_STATE_JSON}); resume from a run's '{LAST_DIR}/' "
        "checkpoint (a model-only checkpoint, e.g. best/ or a --slim run, cannot be resumed)"
    )


@dataclass
class ResumePoint:
    path: Path
    model_config: ModelConfig
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor]

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @property
    def train_config(self) -> dict[str, Any]:
        return dict(self.state["train_config"])


def read_resume_point(path: str | Path) -> ResumePoint:
    """The checkpoint to resume, every field of its training state checked before anything is written."""
    directory = resolve_resume_dir(path)
    source = directory / TRAINING_STATE_JSON
    try:
        state = json.loads(source.read_text())
    except (OSError, ValueError) as err:  # ValueError: also undecodable bytes
        raise CheckpointError(f"{source}: corrupt training state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise CheckpointError(f"{directory}: training state has an unknown format; expected {TRAINING_STATE_FORMAT}")
    problem = training_state_problem(state)
    if problem:
        raise CheckpointError(f"{source}: {problem}; the file is damaged or was edited: resume from an intact "
                              f"'{LAST_DIR}/' or start a new run")
    try:
        tensors = load_file(str(directory / TRAINING_STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{directory / TRAINING_STATE_TENSORS}: corrupt or missing ({err})") from None
    return ResumePoint(directory, read_config(directory), load_weights(directory), state, tensors)


# ----------------------------------------------------------------------------- training state validation


def _at(where: str, problem: str) -> str:
    """`where` followed by a problem that may itself start with a deeper path ('.key' or '[i]')."""
    return f"{where}{problem}" if problem.startswith((".", "[")) else f"{where} {problem}"


def _whole(minimum: int):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number, got {value!r}"
        return None if value >= minimum else f"must be >= {minimum}, got {value}"
    return check


def _number(minimum: float = -math.inf, maximum: float = math.inf, above: bool = False):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        low_ok = value > minimum if above else value >= minimum
        return None if low_ok and value <= maximum else f"is out of range, got {value}"
    return check


def _one_of(*choices: Any):
    return lambda value: None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {value!r}"


def _train_config(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must be an object, got {value!r}"
    try:
        TrainConfig.from_dict(value)
    except (ConfigError, TypeError) as err:
        return str(err)
    return None


def _record(shape: dict[str, Any]):
    """An object with exactly these fields, each checked by its row."""
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be an object, got {value!r}"
        missing, unknown = sorted(set(shape) - set(value)), sorted(set(value) - set(shape))
        if missing or unknown:
            return f"must have the fields {', '.join(sorted(shape))}" + (
                f" (missing {', '.join(missing)})" if missing else f" (unknown {', '.join(unknown)})")
        for key, rule in shape.items():
            problem = rule(value[key])
            if problem:
                return _at(f".{key}", problem)
        return None
    return check


def _list_of(rule):
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"must be a list, got {value!r}"
        for i, item in enumerate(value):
            problem = rule(item)
            if problem:
                return _at(f"[{i}]", problem)
        return None
    return check


def _dict_of(rule):
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be an object, got {value!r}"
        for key, item in value.items():
            problem = rule(item)
            if problem:
                return _at(f".{key}", problem)
        return None
    return check


def _optional(rule):
    return lambda value: None if value is None else rule(value)


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {value!r}"


# The AdamW hyper-parameters a resumed optimiser takes over from its saved param group; other keys are torch's flags.
_PARAM_GROUP_FIELDS = {
    "lr": _number(0.0),
    "weight_decay": _number(0.0),
    "eps": _number(0.0, above=True),
    "betas": lambda v: None if isinstance(v, list) and len(v) == 2 and not any(_number(0.0, 1.0)(b) for b in v)
    and max(v) < 1 else f"must be two numbers in [0, 1), got {v!r}",
    "params": _list_of(_whole(0)),
}


def _param_group(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must be an object, got {value!r}"
    for key, rule in _PARAM_GROUP_FIELDS.items():
        problem = rule(value[key]) if key in value else "is missing"
        if problem:
            return _at(f".{key}", problem)
    return None


# Every field of training_state.json: (required, rule). The optimiser's hyper-parameters come back into
# AdamW on resume, so they are checked as strictly as the trainer's own counters.
TRAINING_STATE_FIELDS: dict[str, tuple[bool, Any]] = {
    "format": (True, _one_of(TRAINING_STATE_FORMAT)),
    "epoch": (True, _whole(0)),
    "step": (True, _whole(0)),
    "seconds": (False, _number(0.0)),
    "best": (False, _optional(_record({"epoch": _whole(0), "criterion": _one_of("delta_m", "val_loss"),
                                       "value": _number()}))),
    "train_config": (True, _train_config),
    "world_size": (False, _whole(1)),
    "optimizer": (True, _record({
        "names": _list_of(_string),
        "scalars": _dict_of(_dict_of(_number())),
        "param_groups": _list_of(_param_group),
    })),
    "scaler": (False, _record({"scale": _number(0.0, above=True), "growth_factor": _number(1.0, above=True),
                               "backoff_factor": _number(0.0, 1.0, above=True), "growth_interval": _whole(1),
                               "_growth_tracker": _whole(0)})),
}


def _non_finite(value: Any, where: str = "") -> str | None:
    """The first NaN or infinity anywhere in a JSON document (json.loads reads NaN and Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the document"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if found:
            return found
    return None


def training_state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a training_state.json document, in words, or None."""
    bad = _non_finite(state)
    if bad:
        return f"{bad.lstrip('.')} is not a finite number"
    unknown = sorted(set(state) - set(TRAINING_STATE_FIELDS))
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    for name, (required, rule) in TRAINING_STATE_FIELDS.items():
        if name not in state:
            if required:
                return f"the field {name!r} is missing"
            continue
        problem = rule(state[name])
        if problem:
            return _at(name, problem)
    epochs = state["train_config"]["epochs"]
    if state["epoch"] > epochs:
        return f"epoch {state['epoch']} lies beyond the run's schedule of {epochs} epochs"
    if state["step"] < state["epoch"]:
        return f"step {state['step']} is fewer than one optimiser step per finished epoch ({state['epoch']})"
    if state.get("best") and state["best"]["epoch"] > state["epoch"]:
        return f"best.epoch {state['best']['epoch']} is after the checkpoint's epoch {state['epoch']}"
    if len(state["optimizer"]["param_groups"]) != 2:
        return f"optimizer.param_groups must hold 2 groups (decay, no decay), got {len(state['optimizer']['param_groups'])}"
    return None


# ----------------------------------------------------------------------------- metrics log and curves


class MetricsLog:
    """`metrics.jsonl`: one flat JSON record per epoch, rewritten atomically on every append."""

    def __init__(self, path: Path, records: list[dict] | None = None):
        self.path = Path(path)
        self.records = list(records or [])

    @classmethod
    def read(cls, path: Path, up_to_epoch: int | None = None) -> list[dict]:
        """The records of a log, those after `up_to_epoch` left out. A line that is not a record is refused
        (rewriting the log would drop it), except an undecodable last line, which a crash may have cut."""
        path = Path(path)
        if not path.is_file():
            return []
        try:
            lines = path.read_text().splitlines()
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot be read ({err}); move it away to resume") from None
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    continue
                record = None
            epoch = record.get("epoch") if isinstance(record, dict) else None
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise CheckpointError(f"{path}: line {number} is not a metrics record with an epoch; "
                                      "fix or remove that line to resume")
            if up_to_epoch is None or epoch <= up_to_epoch:
                records.append(record)
        return records

    def append(self, record: dict) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        payload = "".join(json.dumps(json_ready(r), sort_keys=True) + "\n" for r in self.records)
        write_bytes_atomic(self.path, payload.encode())


def plot_curves(records: list[dict], path: Path) -> None:
    """Training and validation losses and the primary validation metrics per epoch, as one PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # The primary metric of each task (what Delta_m compares) and Delta_m itself; the rest is in metrics.jsonl.
    primary = {f"val/{task}/{name}" for task, (name, _) in TASK_METRICS.items()} | {"val/delta_m"}
    metric_keys = sorted({k for r in records for k in r if k in primary})
    panels = ["loss"] + metric_keys
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    loss_keys = sorted({k for r in records for k in r if k.startswith(("train/loss", "val/loss"))})
    ax = axes[0][0]
    for key in loss_keys:
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            style = "-" if key.startswith("train/") else "--"
            ax.plot(*zip(*points, strict=True), style, marker=".", label=key.replace("/loss", "").replace("/", " ") or key)
    ax.set_yscale("log")
    ax.set_title("loss (total: weighted sum)")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=6)
    for i, key in enumerate(metric_keys, start=1):
        ax = axes[i // cols][i % cols]
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".")
        ax.set_title(key[len("val/"):])
        ax.set_xlabel("epoch")
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _flat_metrics(results: dict) -> dict[str, float]:
    """The scalar validation numbers of an `evaluate` result as `val/<task>/<metric>` keys."""
    flat = {}
    for task, metrics in results["tasks"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("threshold"):
                flat[f"val/{task}/{name}"] = float(value)
    for task, value in results.get("loss", {}).items():
        flat["val/loss" if task == "total" else f"val/loss/{task}"] = float(value)
    if results.get("delta_m") is not None:
        flat["val/delta_m"] = float(results["delta_m"])
    return flat


# ----------------------------------------------------------------------------- progress


def _progress_enabled() -> bool:
    return sys.stderr.isatty()


class _Progress:
    """A tqdm bar on a terminal; otherwise a plain log line a few times per epoch."""

    def __init__(self, total: int, description: str, enabled: bool, bar: bool):
        self.total, self.description, self.enabled = total, description, enabled
        self.every = max(1, total // 4)
        self.bar = None
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        text = {k: f"{v:.4g}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(text, refresh=False)
        elif step % self.every == 0 or step == self.total:
            log.info("%s step %d/%d %s", self.description, step, self.total,
                     " ".join(f"{k} {v}" for k, v in text.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the run


def check_tasks(data: str, root: str | None, tasks: tuple[str, ...]) -> dict[str, int]:
    """task -> channels of the data set; refuses a task the data set lacks."""
    available = dataset_tasks(data, root)
    missing = [t for t in tasks if t not in available]
    if missing:
        where = f" at {root}" if root else ""
        raise DataError(
            f"the {data} data set{where} has no labels for task(s) {', '.join(missing)}; "
            f"available: {', '.join(available) or 'none'}"
        )
    return available


def build_datasets(config: TrainConfig, model_config: ModelConfig):
    """The training and validation sets at the model's input size."""
    tasks = tuple(model_config.tasks)
    size = model_config.swin.img_size
    synthetic = config.data == "synthetic"
    train_set = build_dataset(
        config.data, config.data_root, config.train_split, tasks, size, train=True, seed=config.seed,
        **({"num_samples": config.train_samples} if synthetic else {}),
    )
    # The synthetic validation scenes stay fixed across seeds, so runs are comparable.
    val_set = build_dataset(
        config.data, config.data_root, config.val_split, tasks, size, train=False, seed=0,
        **({"num_samples": config.val_samples} if synthetic else {}),
    )
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if len(dataset) == 0:
            raise DataError(f"the {name} split of {config.data} is empty; check --data-root and the split files")
        dataset[0]  # fail now, with the loader's own message, rather than inside a worker later
    return train_set, val_set


def _check_resume_config(requested: ModelConfig | None, resumed: ModelConfig) -> None:
    if requested is None:
        return
    a, b = requested.to_dict(), resumed.to_dict()
    diffs = _dict_diff(a, b)
    if diffs:
        raise ConfigError(
            "the model options differ from the checkpoint being resumed: "
            + "; ".join(f"{k}: {va!r} here, {vb!r} in the checkpoint" for k, va, vb in diffs[:4])
            + " (leave the model options out when resuming)"
        )


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def with_data_channels(model_config: ModelConfig, channels: Mapping[str, int]) -> ModelConfig:
    """The config with each task's head sized to the data set's classes (NYUD semseg has 40, synthetic 6)."""
    data = model_config.to_dict()
    data["task_channels"] = {t: int(channels[t]) for t in model_config.tasks}
    return ModelConfig.from_dict(data)


def _better(value: float, best: float | None, higher: bool) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value > best if higher else value < best)


def train(
    model_config: ModelConfig | None,
    config: TrainConfig,
    out: str | Path,
    resume: str | Path | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> TrainResult:
    """Train a multi-task model and write the run directory `out` (see the module docstring).

    With `resume`, the model comes from that checkpoint (`model_config`, if
    given, must describe the same model) and training continues after its
    last completed epoch; `config.epochs` may be raised to train longer.
    An `out` that holds another run (another model or settings) is refused
    unless `force` (see `check_output_directory`).
    `progress`: None = a bar on a terminal and log lines otherwise, False = quiet.
    """
    ctx = setup_distributed(config.device)
    threads = torch.get_num_threads()
    try:
        return Trainer(model_config, config, Path(out), resume, progress, ctx, force).run()
    finally:
        torch.set_num_threads(threads)
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_model_config(
    model_config: ModelConfig | None, config: TrainConfig, resume_point: ResumePoint | None
) -> ModelConfig:
    """The model to train: the requested one with heads sized to the data, or the resumed one."""
    if resume_point is not None:
        if model_config is not None:
            _check_resume_config(with_data_channels(model_config, resume_point.model_config.task_channels),
                                 resume_point.model_config)
        model_config = resume_point.model_config
    if model_config is None:
        raise ConfigError("train needs a model config, or a checkpoint to resume")
    channels = check_tasks(config.data, config.data_root, tuple(model_config.tasks))
    if resume_point is None:
        return with_data_channels(model_config, channels)
    wanted = {t: channels[t] for t in model_config.tasks}
    if model_config.task_channels != wanted:
        raise DataError(f"the checkpoint's heads {model_config.task_channels} do not fit the classes of "
                        f"the {config.data} data set {wanted}")
    return model_config


# What a run directory holds (module docstring); anything else in `--out` is someone else's.
RUN_ENTRIES = frozenset({WEIGHTS_FILE, CONFIG_FILE, STATE_FILE, METRICS_FILE, CURVES_FILE, BEST_DIR,
                         LAST_DIR})
# Settings that change how a run is carried out, not what it trains: a restart may change them.
_RUN_MECHANICS = frozenset({"workers", "threads", "device", "eval_every", "eval_initial", "save_every", "slim"})


def _saved_run(out: Path) -> tuple[dict | None, dict | None]:
    """The model config and training settings of the run in `out`, as its checkpoints record them."""
    model, settings = None, None
    for directory in (out / LAST_DIR, out, out / BEST_DIR):
        if model is None and (directory / CONFIG_FILE).is_file():
            model = read_config(directory).to_dict()
        for name in (TRAINING_STATE_JSON, STATE_FILE):
            if settings is None and (directory / name).is_file():
                try:
                    saved = json.loads((directory / name).read_text())
                except (OSError, ValueError) as err:
                    raise CheckpointError(f"{directory / name}: unreadable ({err})") from None
                if isinstance(saved, dict) and isinstance(saved.get("train_config"), dict):
                    settings = saved["train_config"]
    return model, settings


def check_output_directory(out: Path, model_config: ModelConfig, config: TrainConfig,
                           resume_point: ResumePoint | None, force: bool) -> None:
    """Refuse an `out` whose contents this run would replace without being asked to.

    The finished run replaces `out` as a whole, so: files that are not a run's are never replaced; another
    run's checkpoint (another model or other settings) is replaced only with `force`. Resuming the run
    that lives in `out`, or restarting the same run, goes ahead as before.
    """
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # dot-names: our staging
    foreign = [name for name in entries if name not in RUN_ENTRIES]
    if foreign:
        raise ConfigError(f"--out {out}: holds files that are not a training run's ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}), which the finished run would replace; "
                          "choose a new or empty directory")
    if not entries or force:
        return
    if resume_point is not None and resume_point.path.resolve() in (out.resolve(), (out / LAST_DIR).resolve()):
        return
    hint = "pass --force to replace it, --resume it to continue it, or choose another --out"
    try:
        model, settings = _saved_run(out)
    except (CheckpointError, ConfigError) as err:
        raise ConfigError(f"--out {out}: holds a run that cannot be read ({err}); {hint}") from None
    if model is None and settings is None:
        raise ConfigError(f"--out {out}: holds the logs of a run without a checkpoint ({', '.join(entries)}); {hint}")
    ours = config.to_dict()
    differences = _dict_diff(model_config.to_dict(), model) if model is not None else []
    if settings is not None:  # a setting the saved run predates is not a difference
        differences += [(k, ours[k], settings[k]) for k in ours
                        if k in settings and k not in _RUN_MECHANICS and _dict_diff(ours[k], settings[k])]
    if differences:
        shown = "; ".join(f"{k}: {there!r} there, {here!r} here" for k, here, there in differences[:3])
        raise ConfigError(f"--out {out}: holds another run ({shown}); {hint}")


class Trainer:
    """One training run; `train()` is the way to use it."""

    def __init__(self, model_config: ModelConfig | None, config: TrainConfig, out: Path, resume,
                 progress: bool | None, ctx: Distributed, force: bool = False):
        self.started = time.perf_counter()
        self.config, self.out, self.ctx = config, out, ctx
        self.show = progress is not False and ctx.is_main
        self.bar = progress is not False and _progress_enabled()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")

        # Everything is checked before the first write to `out` (the metrics log, at the end of __init__).
        self.precision = resolve_precision(config.precision, ctx.device)
        resume_point = read_resume_point(resume) if resume is not None else None
        self.model_config = resolve_model_config(model_config, config, resume_point)
        check_output_directory(out, self.model_config, config, resume_point, force)
        self.tasks = tuple(self.model_config.tasks)
        self.train_set, self.val_set = build_datasets(config, self.model_config)

        seed_everything(config.seed)  # the same initial weights on every rank
        self.model = MultiTaskSwin(self.model_config)
        if resume_point is not None:
            load_into(self.model, resume_point.weights, str(resume_point.path))
        elif config.pretrained:
            from mtlora.pretrained import load_pretrained_backbone

            left = load_pretrained_backbone(self.model, config.pretrained)
            self.info("loaded pretrained backbone %s (%d adapter tensors start from init)", config.pretrained,
                      len(left))
        self.model.to(ctx.device)

        self.peak_lr = peak_learning_rate(config, ctx.world_size)
        self.optimizer, self.names = build_optimizer(self.model, self.peak_lr, config.weight_decay)
        self.scaler = self.precision.grad_scaler(ctx.device)
        self.epoch, self.step, self.best, self.seconds_before = 0, 0, None, 0.0
        if resume_point is not None:
            load_optimizer_state(self.optimizer, self.names, resume_point.optimizer_tensors,
                                 resume_point.state["optimizer"], str(resume_point.path))
            self.epoch, self.step = resume_point.epoch, int(resume_point.state["step"])
            self.best = resume_point.state.get("best")
            self.seconds_before = float(resume_point.state.get("seconds", 0.0))
            if self.scaler is not None and "scaler" in resume_point.state:
                self.scaler.load_state_dict(resume_point.state["scaler"])
            if self.epoch >= config.epochs:
                raise ConfigError(f"the checkpoint already finished epoch {self.epoch} of {config.epochs}; "
                                  "pass a larger --epochs to train longer")
        self.resumed = resume_point is not None

        self.sampler = DistributedSampler(self.train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                          shuffle=True, seed=config.seed, drop_last=True)
        self.workers = default_workers() if config.workers is None else config.workers
        if ctx.device.type == "cpu":
            torch.set_num_threads(config.threads or default_threads(self.workers))
        self.loader = DataLoader(self.train_set, batch_size=config.batch_size, sampler=self.sampler,
                                 num_workers=self.workers, collate_fn=collate, drop_last=True,
                                 pin_memory=ctx.device.type == "cuda", **worker_settings(self.workers, persistent=True))
        if len(self.loader) == 0:
            raise DataError(
                f"the training split has {len(self.train_set)} samples, {len(self.sampler)} per process: fewer "
                f"than one batch of {config.batch_size}; lower --batch-size or add samples"
            )
        available = min(len(self.loader), config.steps_per_epoch or len(self.loader))
        # Whole optimiser steps only: main.py zeroes the gradients at each epoch's start, dropping a remainder.
        self.steps_per_epoch = available // config.accumulation_steps
        if self.steps_per_epoch == 0:
            raise DataError(f"an epoch has {available} batch(es), fewer than --accumulation-steps "
                            f"{config.accumulation_steps}; lower it or add samples")
        self.batches_per_epoch = self.steps_per_epoch * config.accumulation_steps
        self.available_batches = available
        # The schedule position upstream's last step_update set (None: the warm-up start, before any step).
        self.last_update = self.update_index(self.epoch, self.batches_per_epoch - 1) if self.epoch else None
        self.schedule = WarmupCosine.official(
            self.peak_lr, self.peak_lr * config.warmup_lr_ratio, self.peak_lr * config.min_lr_ratio,
            config.warmup_epochs, config.epochs, self.steps_per_epoch,
        )
        self.criterion = MultiTaskLoss(self.tasks, config.loss_weights or None)
        self.stepper = OptimizerStep(self.optimizer, [p for p in self.model.parameters() if p.requires_grad],
                                     config.clip_grad, config.accumulation_steps, self.scaler)
        baselines = config.baselines if config.baselines is not None else default_baselines(config.data)
        # Delta_m is defined over all tasks; without a baseline for every one it is not reported.
        self.baselines = baselines if baselines is not None and set(self.tasks) <= set(baselines) else None

        self.net = self.model
        if ctx.enabled:
            self.net = DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=bool(unused_parameters(self.model)),
            )
        self.metrics_log = self._open_metrics_log(resume_point) if ctx.is_main else None
        self.last_results: dict | None = None
        self.initial_results: dict | None = None

    def info(self, message: str, *args) -> None:
        if self.show:
            log.info(message, *args)

    def _open_metrics_log(self, resume_point: ResumePoint | None) -> MetricsLog:
        self.out.mkdir(parents=True, exist_ok=True)
        previous = []
        if resume_point is not None:
            here = self.out / METRICS_FILE
            source = here if here.is_file() else resume_point.path.parent / METRICS_FILE
            previous = MetricsLog.read(source, up_to_epoch=self.epoch)
        metrics_log = MetricsLog(self.out / METRICS_FILE, previous)
        metrics_log.write()
        return metrics_log

    def autocast(self):
        return self.precision.autocast(self.ctx.device)

    def sync_gradients(self):
        """DDP all-reduces gradients only on the micro-batch that closes an optimiser step."""
        if self.ctx.enabled and not self.stepper.closes_step:
            return self.net.no_sync()
        return contextlib.nullcontext()

    def run(self) -> TrainResult:
        config = self.config
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.info(
            "training %s (%s, %s) on %s: %d train / %d val samples, %d epochs x %d steps of batch %d x %d "
            "process(es)%s, peak lr %.3g, %s, %d trainable parameters, %d loader worker(s), %s%s",
            ", ".join(self.tasks), self.model_config.adapter.kind, _variant_text(self.model_config), config.data,
            len(self.train_set), len(self.val_set), config.epochs, self.steps_per_epoch, config.batch_size,
            self.ctx.world_size,
            f" x {config.accumulation_steps} accumulated" if config.accumulation_steps > 1 else "", self.peak_lr, self.precision_text(), trainable, self.workers,
            f"{torch.get_num_threads()} CPU thread(s)" if self.ctx.device.type == "cpu" else str(self.ctx.device),
            f", resuming after epoch {self.epoch}" if self.resumed else "",
        )
        if config.eval_initial and not self.resumed:
            self.initial_results = self.validate()
            if self.ctx.is_main:
                self.metrics_log.append({"epoch": 0, "step": 0, **_flat_metrics(self.initial_results)})
                self.info("epoch 0 (initial): %s", _summary(self.initial_results))
        for epoch in range(self.epoch + 1, config.epochs + 1):
            self.epoch = epoch
            record = self.train_epoch(epoch)
            final = epoch == config.epochs
            results = None
            if final or (config.eval_every and epoch % config.eval_every == 0):
                results = self.validate()
            if self.ctx.is_main:
                self.end_epoch(record, results, save=final or bool(config.save_every and epoch % config.save_every == 0))
            self.ctx.barrier()
        seconds = self.elapsed()
        if self.ctx.is_main:
            self.finish(seconds)
        self.ctx.barrier()
        return TrainResult(self.out, self.epoch, self.step, seconds, self.last_results, self.best)

    def update_index(self, epoch: int, batch: int) -> int:
        return WarmupCosine.update_index(epoch - 1, batch, self.available_batches, self.config.accumulation_steps)

    def current_rate(self) -> float:
        return self.schedule.rate(0 if self.last_update is None else self.last_update)

    def precision_text(self) -> str:
        if self.scaler is None:
            return self.precision.name
        return f"{self.precision.name} with a gradient scaler (scale {self.scaler.get_scale():g})"

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over (at most `steps_per_epoch` batches of) the training split; returns its log record."""
        ctx, tasks = self.ctx, self.tasks
        seed_everything(self.config.seed, ctx.rank, epoch)
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        self.model.train()
        started = time.perf_counter()
        sums = torch.zeros(len(tasks) + 1, dtype=torch.float64, device=ctx.device)
        bar = _Progress(self.steps_per_epoch, f"epoch {epoch}/{self.config.epochs}", self.show, self.bar)
        batches = iter(self.loader)
        self.stepper.reset()
        lr, done = self.current_rate(), 0
        skipped = self.stepper.skipped
        try:
            for i in range(self.batches_per_epoch):
                try:
                    batch = next(batches)
                except MTLoRAError as err:
                    raise type(err)(worker_error(err)) from None
                lr = self.current_rate()
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                image = batch["image"].to(ctx.device, non_blocking=True)
                targets = {t: batch[t].to(ctx.device, non_blocking=True) for t in tasks}
                with self.sync_gradients():
                    with self.autocast():
                        outputs = self.net(image)
                    loss, per_task = self.criterion({t: o.float() for t, o in zip(tasks, outputs, strict=True)},
                                                    targets)
                    if not torch.isfinite(loss):
                        raise MTLoRAError(f"the loss became {loss.item()} at epoch {epoch}, batch {i + 1}: training "
                                          "diverged (lower --lr, or check the labels)")
                    grad_norm = self.stepper.backward(loss)
                values = torch.stack([loss.detach()] + [per_task[t].detach() for t in tasks]).double()
                sums += values
                if grad_norm is not None:
                    self.last_update = self.update_index(epoch, i)
                    self.step, done = self.step + 1, done + 1
                    bar.update(done, loss=float(values[0]), lr=lr, grad=grad_norm)
        finally:
            bar.close()
            del batches
        if ctx.enabled:
            dist.all_reduce(sums)
            sums /= ctx.world_size
            average_buffers(self.model)
        means = (sums / self.batches_per_epoch).tolist()
        record = {
            "epoch": epoch, "step": self.step, "lr": lr,
            "time/train_s": round(time.perf_counter() - started, 3), "train/loss": means[0],
            **{f"train/loss/{t}": v for t, v in zip(tasks, means[1:], strict=True)},
        }
        if self.scaler is not None:
            record["train/loss_scale"] = self.scaler.get_scale()
            record["train/skipped_steps"] = self.stepper.skipped - skipped
        return record

    def validate(self) -> dict | None:
        """Rank 0 evaluates the unwrapped model on the validation split; the others wait."""
        results = None
        if self.ctx.is_main:
            results = evaluate(
                self.model, self.val_set, self.tasks, batch_size=self.config.batch_size, device=self.ctx.device,
                workers=self.workers, baselines=self.baselines, criterion=self.criterion,
                precision=self.precision.validation, progress=self.show and self.bar,
            )
            self.model.train()
        self.ctx.barrier()
        return results

    def end_epoch(self, record: dict, results: dict | None, save: bool) -> None:
        """Rank 0: log the epoch, track the best model, redraw the curves, write `last/` when due."""
        config, epoch = self.config, self.epoch
        if results is not None:
            self.last_results = results
            record.update(_flat_metrics(results))
            name, value, higher = _selection(results)
            if _better(value, self.best["value"] if self.best else None, higher):
                self.best = {"epoch": epoch, "criterion": name, "value": value}
                if not config.slim:
                    save_training_checkpoint(self.model, self.out / BEST_DIR, self.model_state(results))
        self.metrics_log.append(record)
        self.info("epoch %d/%d: loss %.4f (%.1fs)%s", epoch, config.epochs, record["train/loss"],
                  record["time/train_s"], f" | {_summary(results)}" if results is not None else "")
        if results is not None:
            plot_curves(self.metrics_log.records, self.out / CURVES_FILE)
        if save and not config.slim:
            save_training_checkpoint(
                self.model, self.out / LAST_DIR, self.model_state(results), self.optimizer, self.names,
                {"epoch": epoch, "step": self.step, "seconds": self.elapsed(), "best": self.best,
                 "train_config": config.to_dict(), "world_size": self.ctx.world_size}, self.scaler,
            )

    def model_state(self, results: dict | None) -> dict[str, Any]:
        """What state.json of a checkpoint records about the run."""
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "data": self.config.data,
            "tasks": list(self.tasks),
            "train_config": self.config.to_dict(),
            "best": self.best,
        }
        if results is not None:
            state["metrics"] = json_ready(results)
        return state

    def finish(self, seconds: float) -> None:
        state = self.model_state(self.last_results)
        state["seconds"] = round(seconds, 1)
        if self.initial_results is not None:
            state["initial_metrics"] = json_ready(self.initial_results)
        if self.metrics_log.records and not (self.out / CURVES_FILE).exists():
            plot_curves(self.metrics_log.records, self.out / CURVES_FILE)
        keep = (METRICS_FILE, CURVES_FILE) if self.config.slim else (METRICS_FILE, CURVES_FILE, BEST_DIR, LAST_DIR)
        finish_run_directory(self.model, self.out, state, keep)
        self.info("wrote %s (%d epochs, %.0f s)", self.out, self.epoch, seconds)


def _variant_text(config: ModelConfig) -> str:
    swin = config.swin
    return f"Swin embed {swin.embed_dim} depths {list(swin.depths)} at {swin.img_size}px"


def _selection(results: dict) -> tuple[str, float, bool]:
    """What picks the best model: Delta_m when baselines exist, else the weighted validation loss."""
    if results.get("delta_m") is not None:
        return "delta_m", float(results["delta_m"]), True
    return "val_loss", float(results["loss"]["total"]), False


def _summary(results: dict) -> str:
    parts = [f"{task} {name} {value:.2f}" for task, (name, value) in primary_metrics(results).items()]
    if results.get("delta_m") is not None:
        parts.append(f"delta_m {results['delta_m']:+.2f}%")
    if "loss" in results:
        parts.append(f"val loss {results['loss']['total']:.4f}")
    return ", ".join(parts)


def finish_run_directory(model: MultiTaskSwin, out: Path, state: dict, keep: tuple[str, ...]) -> None:
    """Put the final model at the top of `out`, keeping the named logs and checkpoints, in one rename.

    The new directory is assembled beside `out` (the kept entries hard-linked,
    so nothing is copied) and swapped in with `commit_directory`.
    """
    building = staging_dir(out)
    try:
        target = building / "run"
        save_checkpoint(model, target, state)
        for name in keep:
            source = out / name
            if source.is_dir():
                shutil.copytree(source, target / name, copy_function=_link_or_copy)
            elif source.is_file():
                _link_or_copy(source, target / name)
        commit_directory(target, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
