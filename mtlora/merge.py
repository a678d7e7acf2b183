"""Merge the task-agnostic adapters into the frozen weights, undo it, or take the adapters out.

After `merge_model` every LoRALinear (plain LoRA, MTLoRA+'s patch-merging
LoRA, and the shared part of the task layers) computes y = W' x + b with
W' = W + s B A. Task-specific branches stay low-rank: `TaskLoRALinear`
recovers W x for a task as W' x - s B A x, so no task needs its own copy of
a full-rank weight.

`unload` and `merge_and_unload` have PEFT's shape: both return the network with every adapter layer
replaced by a plain Linear, the first with the frozen weights as they are, the second with the
task-agnostic updates folded in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtlora.adapters import SHARED, LoRALinear, MTLLoRALinear, TaskLoRALinear, adapter_layers
from mtlora.errors import MergeError


def is_merged(model: nn.Module) -> bool:
    return bool(getattr(model, "merged", False)) or any(layer.merged for _, layer in adapter_layers(model))


def mark_merged(model: nn.Module) -> nn.Module:
    """Flag a freshly built model as merged before merged weights are loaded into it (a merged checkpoint)."""
    for _, layer in adapter_layers(model):
        layer.merged = True
    model.merged = True
    return model


@torch.no_grad()
def merge_model(model: nn.Module, safe: bool = True) -> nn.Module:
    """Fold every task-agnostic adapter into its frozen weight, in place; returns `model`.

    With `safe`, every merged weight is computed in fp32 and checked to be finite
    before any weight is written, so a failure leaves the model untouched.
    """
    if is_merged(model):
        raise MergeError("adapters are already merged; merge the original (unmerged) checkpoint")
    layers = adapter_layers(model)
    if safe:
        for name, layer in layers:
            merged = layer.base.weight.float() + layer.delta_weight(SHARED)
            if not torch.isfinite(merged).all():
                raise MergeError(f"merging '{name}' would produce NaN or Inf weights; its adapter or base weight is not finite")
    for _, layer in layers:
        layer.merge(safe=False)
    model.merged = True
    return model


@torch.no_grad()
def unmerge_model(model: nn.Module) -> nn.Module:
    """Subtract the task-agnostic updates again (exact up to fp32 rounding); returns `model`."""
    layers = adapter_layers(model)
    if not is_merged(model):
        raise MergeError("adapters are not merged; nothing to unmerge")
    for _, layer in layers:
        if layer.merged:
            layer.unmerge()
    model.merged = False
    return model


def _replace_adapters(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, LoRALinear):
            setattr(module, name, child.base)
        else:
            _replace_adapters(child)


def unload(module: nn.Module) -> nn.Module:
    """Replace every adapter layer of `module` by its base Linear, in place; returns `module`.

    The adapters are dropped, not merged: what remains is the frozen network (a merged layer's base
    already holds W + s B A, and keeps it). Task-specific adapters go too, so a multi-task model's
    task streams are lost; use it for a backbone alone."""
    _replace_adapters(module)
    if hasattr(module, "merged"):
        module.merged = False
    return module


@torch.no_grad()
def merge_and_unload(module: nn.Module, safe: bool = True) -> nn.Module:
    """Fold the task-agnostic adapters into the frozen weights (`merge_model`), then `unload`: a plain network
    that computes what the adapted one did. A layer with task-specific adapters cannot become one Linear,
    so such a module is refused before anything changes."""
    tasks = [name for name, layer in adapter_layers(module) if isinstance(layer, TaskLoRALinear)]
    if tasks:
        raise MergeError(f"{len(tasks)} layer(s) carry task-specific adapters (e.g. '{tasks[0]}'); a plain network "
                         "cannot hold them: export the multi-task model instead")
    if not is_merged(module):
        merge_model(module, safe=safe)
    return unload(module)


def _count(tensors) -> tuple[int, int]:
    tensors = list(tensors)
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Parameters and bytes the model needs at inference, before and after merging.

    After merging the shared LoRA factors disappear into W', except where a
    `matrix` task layer still needs them for its low-rank correction; MTL-LoRA's
    up-projections, mixing weights and transforms fold into one (out, r) up
    factor per task.
    """
    before_params, before_bytes = _count(model.parameters())
    after_params, after_bytes = before_params, before_bytes
    layers = adapter_layers(model)
    for _, layer in layers:
        dropped = []
        if layer.has_shared_adapter and not (isinstance(layer, TaskLoRALinear) and layer.shared_mode == "matrix"):
            dropped += [layer.lora_A[SHARED], layer.lora_B[SHARED]]
        if isinstance(layer, MTLLoRALinear):
            dropped += [layer.lora_mtl_B, *layer.lora_mtl_transform.values(), *layer.lora_mtl_mix.values()]
            folded_up = layer.lora_mtl_B[0]  # one (out, r) factor per task
            after_params += len(layer.tasks) * folded_up.numel()
            after_bytes += len(layer.tasks) * folded_up.numel() * folded_up.element_size()
        params, nbytes = _count(dropped)
        after_params -= params
        after_bytes -= nbytes
    return {
        "adapter_layers": len(layers),
        "before": {"params": before_params, "bytes": before_bytes},
        "after": {"params": after_params, "bytes": after_bytes},
    }
