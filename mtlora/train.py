"""The multi-task trainer: the official MTLoRA recipe, checkpoints without pickle, one or many processes.

Recipe (scale-lab/MTLoRA `main.py`, `optimizer.py`, `lr_scheduler.py`, `config.py`):
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.05, none on biases, norms
and position-bias tables), a peak learning rate of 5e-4 scaled linearly by
global batch / 512, per-step linear warm-up from lr * 1e-3 over 20 epochs then
cosine decay to lr * 1e-2 over the rest of 300 epochs, gradient clipping at
5.0, the official loss weights, bf16 autocast on CUDA.

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
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Everything about a run except the model. The optimisation defaults are the official recipe
    (whose data set is PASCAL-Context; `data` defaults to the synthetic set, which needs no files).

    `batch_size` is per process. `lr` is the peak learning rate; None applies
    the official linear scaling 5e-4 x global batch / 512. Warm-up starts at
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
        if self.data not in DATASET_NAMES:
            raise ConfigError(f"unknown data set {self.data!r}; choose one of {', '.join(DATASET_NAMES)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. 'auto' is bf16 on a CUDA GPU that supports it."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


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
    # Swin's `no_weight_decay` set and keywords, plus the official rule for biases and 1-D tensors.
    return param.ndim <= 1 or name.endswith(".bias") or "relative_position_bias_table" in name \
        or "absolute_pos_embed" in name


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
    """Per-step learning rate: linear warm-up, then half a cosine (timm's CosineLRScheduler, warmup_prefix)."""

    peak_lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + step * (self.peak_lr - self.warmup_lr) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def peak_learning_rate(config: TrainConfig, world_size: int) -> float:
    if config.lr is not None:
        return float(config.lr)
    return OFFICIAL_BASE_LR * config.batch_size * world_size / LR_REFERENCE_BATCH


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
            write_json_atomic(target / TRAINING_STATE_JSON,
                              {"format": TRAINING_STATE_FORMAT, "optimizer": meta, **(training_state or {})})
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
    directory = resolve_resume_dir(path)
    try:
        state = json.loads((directory / TRAINING_STATE_JSON).read_text())
    except (OSError, ValueError) as err:  # ValueError: also undecodable bytes
        raise CheckpointError(f"{directory / TRAINING_STATE_JSON}: corrupt training state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT or "epoch" not in state or "train_config" not in state:
        raise CheckpointError(f"{directory}: training state has an unknown format; expected {TRAINING_STATE_FORMAT}")
    try:
        tensors = load_file(str(directory / TRAINING_STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{directory / TRAINING_STATE_TENSORS}: corrupt or missing ({err})") from None
    return ResumePoint(directory, read_config(directory), load_weights(directory), state, tensors)


# ----------------------------------------------------------------------------- metrics log and curves


class MetricsLog:
    """`metrics.jsonl`: one flat JSON record per epoch, rewritten atomically on every append."""

    def __init__(self, path: Path, records: list[dict] | None = None):
        self.path = Path(path)
        self.records = list(records or [])

    @classmethod
    def read(cls, path: Path, up_to_epoch: int | None = None) -> list[dict]:
        path = Path(path)
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash; the epochs after it are retrained anyway
            if up_to_epoch is None or int(record.get("epoch", 0)) <= up_to_epoch:
                records.append(record)
        return records

    def append(self, record: dict) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.partial")
        tmp.write_text("".join(json.dumps(json_ready(r), sort_keys=True) + "\n" for r in self.records))
        os.replace(tmp, self.path)


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
) -> TrainResult:
    """Train a multi-task model and write the run directory `out` (see the module docstring).

    With `resume`, the model comes from that checkpoint (`model_config`, if
    given, must describe the same model) and training continues after its
    last completed epoch; `config.epochs` may be raised to train longer.
    `progress`: None = a bar on a terminal and log lines otherwise, False = quiet.
    """
    ctx = setup_distributed(config.device)
    threads = torch.get_num_threads()
    try:
        return Trainer(model_config, config, Path(out), resume, progress, ctx).run()
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


class Trainer:
    """One training run; `train()` is the way to use it."""

    def __init__(self, model_config: ModelConfig | None, config: TrainConfig, out: Path, resume,
                 progress: bool | None, ctx: Distributed):
        self.started = time.perf_counter()
        self.config, self.out, self.ctx = config, out, ctx
        self.show = progress is not False and ctx.is_main
        self.bar = progress is not False and _progress_enabled()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")

        resume_point = read_resume_point(resume) if resume is not None else None
        self.model_config = resolve_model_config(model_config, config, resume_point)
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
        self.epoch, self.step, self.best, self.seconds_before = 0, 0, None, 0.0
        if resume_point is not None:
            load_optimizer_state(self.optimizer, self.names, resume_point.optimizer_tensors,
                                 resume_point.state["optimizer"], str(resume_point.path))
            self.epoch, self.step = resume_point.epoch, int(resume_point.state["step"])
            self.best = resume_point.state.get("best")
            self.seconds_before = float(resume_point.state.get("seconds", 0.0))
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
        self.steps_per_epoch = min(len(self.loader), config.steps_per_epoch or len(self.loader))
        self.schedule = WarmupCosine(
            self.peak_lr, self.peak_lr * config.warmup_lr_ratio, self.peak_lr * config.min_lr_ratio,
            int(round(config.warmup_epochs * self.steps_per_epoch)), self.steps_per_epoch * config.epochs,
        )
        self.criterion = MultiTaskLoss(self.tasks, config.loss_weights or None)
        self.autocast_dtype = resolve_precision(config.precision, ctx.device)
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
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def run(self) -> TrainResult:
        config = self.config
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.info(
            "training %s (%s, %s) on %s: %d train / %d val samples, %d epochs x %d steps of batch %d x %d "
            "process(es), peak lr %.3g, %s, %d trainable parameters, %d loader worker(s), %s%s",
            ", ".join(self.tasks), self.model_config.adapter.kind, _variant_text(self.model_config), config.data,
            len(self.train_set), len(self.val_set), config.epochs, self.steps_per_epoch, config.batch_size,
            self.ctx.world_size, self.peak_lr, "bf16" if self.autocast_dtype else "fp32", trainable, self.workers,
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

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over (at most `steps_per_epoch` batches of) the training split; returns its log record."""
        ctx, tasks = self.ctx, self.tasks
        seed_everything(self.config.seed, ctx.rank, epoch)
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        started = time.perf_counter()
        sums = torch.zeros(len(tasks) + 1, dtype=torch.float64, device=ctx.device)
        bar = _Progress(self.steps_per_epoch, f"epoch {epoch}/{self.config.epochs}", self.show, self.bar)
        batches = iter(self.loader)
        try:
            for i in range(self.steps_per_epoch):
                try:
                    batch = next(batches)
                except MTLoRAError as err:
                    raise type(err)(worker_error(err)) from None
                lr = self.schedule(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                image = batch["image"].to(ctx.device, non_blocking=True)
                targets = {t: batch[t].to(ctx.device, non_blocking=True) for t in tasks}
                with self.autocast():
                    outputs = self.net(image)
                loss, per_task = self.criterion({t: o.float() for t, o in zip(tasks, outputs, strict=True)}, targets)
                if not torch.isfinite(loss):
                    raise MTLoRAError(f"the loss became {loss.item()} at epoch {epoch}, step {i + 1}: training "
                                      "diverged (lower --lr, or check the labels)")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, self.config.clip_grad)
                             if self.config.clip_grad > 0 else torch.zeros(()))
                self.optimizer.step()
                self.step += 1
                values = torch.stack([loss.detach()] + [per_task[t].detach() for t in tasks]).double()
                sums += values
                bar.update(i + 1, loss=float(values[0]), lr=lr, grad=float(grad_norm))
        finally:
            bar.close()
            del batches
        if ctx.enabled:
            dist.all_reduce(sums)
            sums /= ctx.world_size
            average_buffers(self.model)
        means = (sums / self.steps_per_epoch).tolist()
        return {
            "epoch": epoch, "step": self.step, "lr": self.schedule(self.step - 1),
            "time/train_s": round(time.perf_counter() - started, 3), "train/loss": means[0],
            **{f"train/loss/{t}": v for t, v in zip(tasks, means[1:], strict=True)},
        }

    def validate(self) -> dict | None:
        """Rank 0 evaluates the unwrapped model on the validation split; the others wait."""
        results = None
        if self.ctx.is_main:
            results = evaluate(
                self.model, self.val_set, self.tasks, batch_size=self.config.batch_size, device=self.ctx.device,
                workers=self.workers, baselines=self.baselines, criterion=self.criterion,
                precision="bf16" if self.autocast_dtype else "fp32", progress=self.show and self.bar,
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
                 "train_config": config.to_dict(), "world_size": self.ctx.world_size},
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
