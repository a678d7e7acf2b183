"""Pretrained Swin backbones from a local file, in timm's or Microsoft's original layout.

There is no model hub here: the user names the file. Conversion and resizing
(relative position bias tables for another window size, patch embedding for
another patch size) are timm's own checkpoint filter, so a 224 ImageNet
checkpoint runs at 448 exactly as timm would run it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from mtlora.adapters import LoRALinear
from mtlora.checkpoint import check_values
from mtlora.errors import CheckpointError
from mtlora.model import build_swin

# Backbone parameters a classification checkpoint has and our backbone does not use.
_UNUSED_PREFIXES = ("head.", "norm.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such pretrained weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors file ({err})") from None
    from mtlora.safe_pickle import load_allowlisted

    data = load_allowlisted(path)
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return data


def load_pretrained_backbone(model, path: str | Path) -> list[str]:
    """Load ImageNet Swin weights into `model.backbone`; returns the backbone keys left at init.

    Only adapter parameters may be left at their initial values; anything else
    missing means the file is not a Swin of this size.
    """
    state_dict = read_state_dict(path)
    plain = build_swin(model.config)
    try:
        converted = checkpoint_filter_fn(state_dict, plain)
    except (RuntimeError, KeyError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a Swin Transformer checkpoint this backbone can use ({err})") from None
    wrapped = {name for name, m in model.backbone.named_modules() if isinstance(m, LoRALinear)}
    own = model.backbone.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key.startswith(_UNUSED_PREFIXES):
            continue
        module, _, leaf = key.rpartition(".")
        if module in wrapped:
            key = f"{module}.base.{leaf}"
        if key not in own:
            raise CheckpointError(f"{path}: unexpected parameter '{key}'; is this a Swin v1 checkpoint?")
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, the backbone expects {tuple(own[key].shape)}; "
                "check the variant (embed dim, depths, heads)"
            )
        mapped[key] = value
    missing = sorted(k for k in set(own) - set(mapped) if "lora_" not in k)
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} backbone parameters (e.g. {missing[0]}); wrong variant?")
    check_values(mapped, str(path), own)
    model.backbone.load_state_dict(mapped, strict=False)
    return sorted(set(own) - set(mapped))
