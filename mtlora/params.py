"""Parameter accounting by group, as `mtlora info` prints it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from mtlora.adapters import SHARED, LoRALinear, MTLLoRALinear, TaskLoRALinear


@dataclass
class ParameterCount:
    total: int = 0
    trainable: int = 0
    shared_adapters: int = 0
    task_adapters: int = 0
    decoders: int = 0
    other_trainable: int = 0
    per_task_adapters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _task_adapter_sizes(model: nn.Module, tasks: tuple[str, ...]) -> tuple[dict[str, int], int]:
    """Per-task adapter parameters, and those shared by all tasks in task layers (MTL-LoRA's A and B bank,
    the `addition` mode's LayerNorm)."""
    per_task = dict.fromkeys(tasks, 0)
    common = 0
    for module in model.modules():
        if isinstance(module, MTLLoRALinear):
            common += module.lora_mtl_A.numel() + module.lora_mtl_B.numel()
            for t in module.tasks:
                per_task[t] += module.lora_mtl_transform[t].numel() + module.lora_mtl_mix[t].numel()
        elif isinstance(module, TaskLoRALinear):
            for t in module.tasks:
                per_task[t] += module.lora_A[t].numel() + module.lora_B[t].numel()
            if hasattr(module, "lora_norm"):
                common += sum(p.numel() for p in module.lora_norm.parameters())
    return per_task, common


def count_parameters(model: nn.Module) -> ParameterCount:
    """Totals and groups: shared adapters (with learnt shared scales), task adapters, decoders (+downsamplers),
    other trainable."""
    tasks = tuple(model.tasks)
    count = ParameterCount()
    for name, param in model.named_parameters():
        n = param.numel()
        count.total += n
        if not param.requires_grad:
            continue
        count.trainable += n
        if name.startswith(("decoders.", "downsamplers.", "shared_downsampler.")):
            count.decoders += n
    for module in model.modules():
        if isinstance(module, LoRALinear):
            if module.has_shared_adapter:
                count.shared_adapters += module.lora_A[SHARED].numel() + module.lora_B[SHARED].numel()
            if module.trainable_shared_scale is not None:
                count.shared_adapters += module.trainable_shared_scale.numel()
    per_task, common = _task_adapter_sizes(model, tasks)
    count.per_task_adapters = per_task
    count.task_adapters = sum(per_task.values()) + common
    count.other_trainable = count.trainable - count.decoders - count.shared_adapters - count.task_adapters
    return count
