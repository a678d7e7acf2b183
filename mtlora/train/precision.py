"""The numeric precision of a run: autocast dtype and gradient scaler per mode, and what 'auto' picks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mtlora.errors import ConfigError


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
