"""The optimiser and its steps: AdamW over the official parameter groups, and `OptimizerStep`, which
accumulates micro-batches, unscales (fp16), clips and steps as the official loop does."""

from __future__ import annotations

import math

import torch

from mtlora.errors import ConfigError


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
