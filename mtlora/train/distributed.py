"""Processes and devices: joining torchrun's process group, per-rank seeding, how many threads and
loader workers a process takes, and the DDP helpers (parameters without gradients, BatchNorm averaging)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from mtlora.errors import ConfigError

if TYPE_CHECKING:
    from mtlora.model import MultiTaskSwin


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
