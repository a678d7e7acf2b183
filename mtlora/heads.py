"""Per-task feature downsamplers and HRNet-style decoder heads, as in the official MTLoRA model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample_to_first(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every map bilinearly resized to the size of the first (finest) one."""
    size = features[0].shape[-2:]
    return [features[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]]


class FeatureDownsampler(nn.Module):
    """One 1x1 convolution (no bias) per scale, from backbone channels to decoder channels.

    Args:
        dims: channels of the backbone features, one per scale.
        channels: decoder channels, one per scale.
    """

    def __init__(self, dims: list[int], channels: list[int]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(d, c, 1, bias=False) for d, c in zip(dims, channels, strict=True))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features: NHWC tensors (B, h_i, w_i, dims[i]); returns NCHW (B, channels[i], h_i, w_i)."""
        return [conv(f.permute(0, 3, 1, 2)) for conv, f in zip(self.convs, features, strict=True)]


class HRNetHead(nn.Module):
    """Concatenate all scales at the finest resolution, then 1x1 conv (4x), BN, ReLU, 1x1 conv.

    Args:
        channels: decoder channels of each scale.
        num_outputs: output channels of the task.
    """

    def __init__(self, channels: list[int], num_outputs: int):
        super().__init__()
        total = sum(channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(total, total * 4, 1),
            nn.BatchNorm2d(total * 4, momentum=0.1),
            nn.ReLU(inplace=False),
            nn.Conv2d(total * 4, num_outputs, 1),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.last_layer(torch.cat(upsample_to_first(features), dim=1))


class FeatureLayout(nn.Module):
    """No downsampler (the official MODEL.DECODER_DOWNSAMPLER off): NHWC features to NCHW, channels unchanged."""

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f.permute(0, 3, 1, 2) for f in features]
