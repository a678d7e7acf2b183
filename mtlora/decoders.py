"""The official MTLoRA decoder heads besides HRNet (its MODEL.DECODER_HEAD), in plain PyTorch.

Each head takes the four per-stage maps of a task, NCHW and finest first, and
returns (B, num_outputs, h, w) at a resolution of its own; the model then
resizes that to the input size. Module names follow scale-lab/MTLoRA
(`models/segformer.py`, `models/updecoder.py`, `models/aspp.py`, which build
them with mmcv), so an official state dict loads as it is:

- `segformer`: one Linear per scale to `channels`, all upsampled to the finest
  scale, a 1x1 conv + BatchNorm + ReLU fuse (mmcv's ConvModule: `linear_fuse.conv`,
  `linear_fuse.bn`), dropout, a 1x1 classifier (`linear_pred`). `conv_seg` is the
  unused classifier of mmseg's BaseDecodeHead; it is kept because the official
  model has (and trains) it.
- `updecoder`: the scales concatenated at the finest one, three stride-2
  transposed convs (32 filters) with BatchNorm and ReLU, a 3x3 conv + BatchNorm +
  ReLU to the outputs, then two bilinear 2x upsamplings.
- `aspp`: DeepLab v3's head on the concatenated scales: 1x1 conv, three 3x3
  atrous convs (rates 12, 24, 36) and image pooling, 256 channels each, a 1x1
  projection with dropout 0.5, a 3x3 conv + BatchNorm + ReLU and a 1x1 classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import ConfigError
from mtlora.heads import HRNetHead, upsample_to_first


class _Embedding(nn.Module):
    """SegFormer's per-scale Linear over channels (the official `MLP`): (B, C, h, w) -> (B, E, h, w)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


class _ConvBNReLU(nn.Module):
    """mmcv's ConvModule with a norm: conv without bias, BatchNorm (`bn`), ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder.

    Args:
        in_channels: channels of the four scales, finest first.
        num_outputs: output channels of the task.
        channels: the embedding width (the official MODEL.SEGFORMER_CHANNELS).
    """

    def __init__(self, in_channels: list[int], num_outputs: int, channels: int = 256):
        super().__init__()
        if len(in_channels) != 4:
            raise ConfigError(f"the SegFormer head reads 4 scales, got {len(in_channels)}")
        self.conv_seg = nn.Conv2d(channels, num_outputs, 1)  # unused, as in the official head
        c1, c2, c3, c4 = in_channels
        self.linear_c4 = _Embedding(c4, channels)
        self.linear_c3 = _Embedding(c3, channels)
        self.linear_c2 = _Embedding(c2, channels)
        self.linear_c1 = _Embedding(c1, channels)
        self.linear_fuse = _ConvBNReLU(4 * channels, channels)
        self.dropout = nn.Dropout2d(0.1)
        self.linear_pred = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        c1, c2, c3, c4 = features
        size = c1.shape[-2:]

        def embed(layer: _Embedding, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(layer(x), size=size, mode="bilinear", align_corners=False)

        fused = torch.cat([embed(self.linear_c4, c4), embed(self.linear_c3, c3), embed(self.linear_c2, c2),
                           self.linear_c1(c1)], dim=1)
        return self.linear_pred(self.dropout(self.linear_fuse(fused)))


class UpDecoderHead(nn.Module):
    """Transposed-convolution decoder: 3 x (deconv 2x2 stride 2, BN, ReLU), conv 3x3, BN, ReLU, 4x bilinear.

    Args:
        in_channels: channels of the four scales (concatenated at the finest).
        num_outputs: output channels of the task.
    """

    filters = (32, 32, 32)

    def __init__(self, in_channels: list[int], num_outputs: int):
        super().__init__()
        layers: list[nn.Module] = []
        planes = sum(in_channels)
        for width in self.filters:
            layers += [nn.ConvTranspose2d(planes, width, 2, stride=2, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            planes = width
        self.deconv_layers = nn.Sequential(*layers)
        self.conv_layers = nn.Sequential(nn.Conv2d(planes, num_outputs, 3, padding=1), nn.BatchNorm2d(num_outputs),
                                         nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.conv_layers(self.deconv_layers(torch.cat(upsample_to_first(features), dim=1)))
        return self.up(self.up(out))


class _ASPPPooling(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class _ASPP(nn.Module):
    rates = (12, 24, 36)
    width = 256

    def __init__(self, in_channels: int):
        super().__init__()
        w = self.width

        def branch(*first: nn.Module) -> nn.Sequential:
            return nn.Sequential(*first, nn.BatchNorm2d(w), nn.ReLU())

        self.convs = nn.ModuleList(
            [branch(nn.Conv2d(in_channels, w, 1, bias=False))]
            + [branch(nn.Conv2d(in_channels, w, 3, padding=r, dilation=r, bias=False)) for r in self.rates]
            + [_ASPPPooling(in_channels, w)]
        )
        self.project = nn.Sequential(nn.Conv2d(5 * w, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(upsample_to_first(features), dim=1)
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class ASPPHead(nn.Sequential):
    """DeepLab v3's ASPP head (the official `aspp`, multi-scale input).

    Args:
        in_channels: channels of the four scales (concatenated at the finest).
        num_outputs: output channels of the task.
    """

    def __init__(self, in_channels: list[int], num_outputs: int):
        w = _ASPP.width
        super().__init__(_ASPP(sum(in_channels)), nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                         nn.ReLU(), nn.Conv2d(w, num_outputs, 1))


def build_decoder(head: str, in_channels: list[int], num_outputs: int, segformer_channels: int = 256) -> nn.Module:
    """The decoder head `head` (one of `mtlora.config.DECODER_HEADS`) for the given input channels."""
    builders = {
        "hrnet": lambda: HRNetHead(in_channels, num_outputs),
        "segformer": lambda: SegFormerHead(in_channels, num_outputs, segformer_channels),
        "updecoder": lambda: UpDecoderHead(in_channels, num_outputs),
        "aspp": lambda: ASPPHead(in_channels, num_outputs),
    }
    if head not in builders:
        raise ConfigError(f"unknown decoder head '{head}'; choose one of {', '.join(builders)}")
    return builders[head]()
