"""Low-rank adapters for the Linear layers of a timm Swin Transformer.

Three layer types, all wrapping the frozen `nn.Linear` they replace (kept as `base`):

- `LoRALinear`: task-agnostic LoRA (MTLoRA's TA-LoRA), y = W x + b + s B A x.
- `TaskLoRALinear`: TA-LoRA plus one independent low-rank pair per task (MTLoRA's
  TS-LoRA). `forward_tasks` applies the frozen projection to the shared stream
  and adds each task's low-rank term computed on that task's own stream.
- `MTLLoRALinear`: TA-LoRA plus MTL-LoRA task adapters (Yang et al. 2024): a shared
  down-projection A, a task-specific r x r transform (identity at init) and
  `num_up` up-projections mixed per task by softmax(w_t / temperature).

Adapter parameters live in dicts keyed by `shared` or the task name, and every
one of them carries the `lora_` prefix, which is what trainability and
state-dict filtering look for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import ConfigError

ADAPTER_PREFIX = "lora_"
SHARED = "shared"


def _kaiming(param: nn.Parameter) -> None:
    # The LoRA initialisation: A like nn.Linear's default weight, B zero, so training starts at W.
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """A frozen Linear with a task-agnostic low-rank update.

    Args:
        base: the pretrained layer; its weight stays frozen.
        rank: r of the update B A.
        scale: plain multiplier s of the update (MTLoRA's convention, not alpha / r).
        dropout: dropout on the adapter input.
        scale_trainable: learn s as the parameter `lora_shared_scale` (shape [1]), as the official
            MTLORA.TRAINABLE_SCALE_SHARED does.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0, scale_trainable: bool = False):
        super().__init__()
        if rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict({SHARED: nn.Parameter(base.weight.new_zeros(rank, self.in_features))})
        self.lora_B = nn.ParameterDict({SHARED: nn.Parameter(base.weight.new_zeros(self.out_features, rank))})
        self.scaling: dict[str, float] = {SHARED: float(scale)}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        _kaiming(self.lora_A[SHARED])
        if scale_trainable:
            self.lora_shared_scale = nn.Parameter(base.weight.new_tensor([float(scale)]))

    def extra_repr(self) -> str:
        rank = self.lora_A[SHARED].shape[0] if self.has_shared_adapter else 0
        return f"rank={rank}, scale={self.scaling[SHARED]}, merged={self.merged}"

    @property
    def has_shared_adapter(self) -> bool:
        return SHARED in self.lora_A

    @property
    def trainable_shared_scale(self) -> nn.Parameter | None:
        """The learnt shared scale `lora_shared_scale` (official TRAINABLE_SCALE_SHARED); None when fixed."""
        return getattr(self, "lora_shared_scale", None)

    def scale_of(self, name: str = SHARED) -> float | torch.Tensor:
        """The multiplier of adapter `name`: a number, or the learnt [1] tensor for a trainable shared scale."""
        if name == SHARED and self.trainable_shared_scale is not None:
            return self.trainable_shared_scale
        return self.scaling[name]

    def delta_weight(self, name: str = SHARED) -> torch.Tensor:
        """s * B @ A in fp32, the amount `merge` adds to the frozen weight."""
        if name == SHARED and not self.has_shared_adapter:
            return self.base.weight.new_zeros(self.out_features, self.in_features, dtype=torch.float32)
        return self.scale_of(name) * (self.lora_B[name].float() @ self.lora_A[name].float())

    def shared_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The task-agnostic low-rank term s * B (A x), without forming B A."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A[SHARED]), self.lora_B[SHARED]) * self.scale_of(SHARED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.shared_delta(x)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Fold the task-agnostic update into the frozen weight: W' = W + s B A.

        With `safe`, the sum is computed in fp32 on a copy and checked to be finite
        before it replaces the weight.
        """
        if self.merged:
            raise RuntimeError("adapter is already merged")
        if not self.has_shared_adapter:  # an `addition` task layer: nothing task-agnostic to fold
            self.merged = True
            return
        weight = self.base.weight
        merged = weight.float() + self.delta_weight(SHARED)
        if safe and not torch.isfinite(merged).all():
            raise ValueError("merging would produce NaN or Inf weights; the adapter or base weights are not finite")
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weight (within fp32 rounding)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        if not self.has_shared_adapter:
            self.merged = False
            return
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight(SHARED)).to(weight.dtype))
        self.merged = False


class TaskLoRALinear(LoRALinear):
    """TA-LoRA plus an independent low-rank pair per task, as in MTLoRA's last block of a stage.

    In `matrix` mode a task's output is W x_shared + b + s_t B_t A_t x_task: the frozen
    projection sees the shared stream and the task adds its own term on its own
    stream. `matrixv2` adds the shared LoRA term to every task as well. In `addition`
    mode there is no task-agnostic LoRA: the shared output is W x + b + LayerNorm of
    the sum of the task outputs (`lora_norm`), so it depends on every task.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scale: float,
        task_ranks: dict[str, int],
        task_scales: dict[str, float],
        shared_mode: str = "matrix",
        dropout: float = 0.0,
        scale_trainable: bool = False,
        **task_options,
    ):
        """`task_options` go to `init_task_adapters` (MTL-LoRA: `num_up`, `temperature`)."""
        super().__init__(base, rank, scale, dropout, scale_trainable)
        self.tasks = tuple(task_ranks)
        self.shared_mode = shared_mode
        if shared_mode == "addition":
            del self.lora_A[SHARED], self.lora_B[SHARED]
            self.lora_norm = nn.LayerNorm(self.out_features, device=base.weight.device, dtype=base.weight.dtype)
        self.scaling.update({t: float(task_scales[t]) for t in self.tasks})
        self.init_task_adapters(task_ranks, **task_options)

    def init_task_adapters(self, task_ranks: dict[str, int]) -> None:
        """One independent low-rank pair per task, initialised as LoRA is."""
        for task, task_rank in task_ranks.items():
            if task_rank <= 0:
                raise ConfigError(f"task rank for '{task}' must be a positive integer, got {task_rank}")
            self.lora_A[task] = nn.Parameter(self.base.weight.new_zeros(task_rank, self.in_features))
            self.lora_B[task] = nn.Parameter(self.base.weight.new_zeros(self.out_features, task_rank))
            _kaiming(self.lora_A[task])

    def task_delta(self, task: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A[task]), self.lora_B[task]) * self.scaling[task]

    def folded_task_factors(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) with the scale folded into up, so that delta_t(x) = up @ (down @ x)."""
        return self.lora_A[task], self.lora_B[task] * self.scaling[task]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The shared output alone, every task reading `x` (a block without task streams)."""
        if self.shared_mode == "addition":
            return self.forward_tasks(x)[0]
        return super().forward(x)

    def forward_tasks(
        self, x: torch.Tensor, x_tasks: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Shared output and one output per task.

        Args:
            x: shared stream (..., in_features).
            x_tasks: each task's own stream; None means every task reads `x`.
        """
        if self.shared_mode == "addition":
            # Nothing task-agnostic to merge: W x + b is the anchor, merged or not.
            frozen = self.base(x)
            outputs = {t: frozen + self.task_delta(t, x if x_tasks is None else x_tasks[t]) for t in self.tasks}
            shared = frozen + self.lora_norm(torch.stack(list(outputs.values()), dim=0).sum(dim=0))
            return shared, outputs
        if self.merged:
            shared = self.base(x)
            # After merging, W x is recovered with a low-rank correction instead of a
            # second copy of the full-rank weight.
            anchor = shared if self.shared_mode == "matrixv2" else shared - self.shared_delta(x)
        else:
            frozen = self.base(x)
            shared = frozen + self.shared_delta(x)
            anchor = shared if self.shared_mode == "matrixv2" else frozen
        outputs = {}
        for task in self.tasks:
            task_input = x if x_tasks is None else x_tasks[task]
            outputs[task] = anchor + self.task_delta(task, task_input)
        return shared, outputs


class MTLLoRALinear(TaskLoRALinear):
    """TA-LoRA plus MTL-LoRA task adapters in place of independent per-task pairs.

    delta_t(x) = s_t * (sum_i softmax(w_t / T)_i B_i) Lambda_t (A x), with A shared by
    all tasks, Lambda_t an r x r transform initialised to the identity, and B_i the
    `num_up` shared up-projections.
    """

    def init_task_adapters(self, task_ranks: dict[str, int], num_up: int = 3, temperature: float = 0.5) -> None:
        """The shared down-projection, `num_up` up-projections, and per task an r x r transform (identity)
        and the mixing logits of the up-projections (softmax(w_t / `temperature`))."""
        self.temperature = float(temperature)
        task_rank = set(task_ranks.values())
        if len(task_rank) != 1:
            raise ConfigError(f"MTL-LoRA shares its down-projection, so every task needs the same rank; got {task_ranks}")
        (r,) = task_rank
        if r <= 0:
            raise ConfigError(f"task rank must be a positive integer, got {r}")
        weight = self.base.weight
        self.lora_mtl_A = nn.Parameter(weight.new_zeros(r, self.in_features))
        self.lora_mtl_B = nn.Parameter(weight.new_zeros(num_up, self.out_features, r))
        self.lora_mtl_transform = nn.ParameterDict({t: nn.Parameter(torch.eye(r)) for t in self.tasks})
        self.lora_mtl_mix = nn.ParameterDict({t: nn.Parameter(weight.new_zeros(num_up)) for t in self.tasks})
        _kaiming(self.lora_mtl_A)
        for t in self.tasks:
            nn.init.uniform_(self.lora_mtl_mix[t], -1.0, 1.0)

    def task_up(self, task: str) -> torch.Tensor:
        """The task's mixed up-projection with the transform and scale folded in: (out, r)."""
        weights = torch.softmax(self.lora_mtl_mix[task].float() / self.temperature, dim=0).to(self.lora_mtl_B.dtype)
        mixed = torch.einsum("n,nor->or", weights, self.lora_mtl_B)
        return (mixed @ self.lora_mtl_transform[task]) * self.scaling[task]

    def task_delta(self, task: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout(x), self.lora_mtl_A), self.task_up(task))

    def folded_task_factors(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        # The down-projection is the same tensor for every task, so an exporter can compute A x once.
        return self.lora_mtl_A, self.task_up(task)


# Which layer types can carry an adapter: one dispatch table.
SUPPORTED_LAYERS: dict[type, type] = {nn.Linear: LoRALinear}


def check_adaptable(module: nn.Module, name: str) -> nn.Linear:
    for layer_type in SUPPORTED_LAYERS:
        if type(module) is layer_type:
            return module
    supported = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
    raise ConfigError(f"cannot put a LoRA adapter on '{name}' ({type(module).__name__}); supported layers: {supported}")


def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_PREFIX in name
