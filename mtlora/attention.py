"""Swin's shifted-window attention, once, for the model's task blocks and for the ONNX export.

The task blocks need the attention output before the projection (each task
projects it with its own low-rank terms), which timm's WindowAttention does not
expose; the export needs every reshape with static sizes and the key already
transposed, so the graph has no shape arithmetic. Both call
`window_attention` with their own q/k/v projection. Only public timm
attributes are read: the relative position table and index buffers, the
shift mask, the window and shift sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# windows (B * nW, N, C) -> q (B * nW, heads, N, d), k transposed (B * nW, heads, d, N), v (B * nW, heads, N, d)
QKV = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def relative_position_bias(attn: nn.Module) -> torch.Tensor:
    """(1, heads, N, N): the learned bias of every query-key offset inside a window (N = window area)."""
    table, index = attn.relative_position_bias_table, attn.relative_position_index
    area = index.shape[0]
    bias = table[index.reshape(-1)].reshape(area, area, -1)  # (N, N, heads)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


def fused_qkv(attn: nn.Module) -> QKV:
    """q, k^T, v from timm's fused qkv projection (a LoRA layer here), as the model computes them."""
    heads = attn.num_heads

    def project(windows: torch.Tensor):
        n, c = windows.shape[1], windows.shape[2]
        qkv = attn.qkv(windows).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k.transpose(-2, -1), v

    return project


def window_attention(
    x: torch.Tensor,
    *,
    dim: int,
    resolution: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    heads: int,
    scale: float,
    qkv: QKV,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """Shifted-window attention up to, not including, the output projection.

    x: (B, H, W, C = dim) after norm1 -> (B, H, W, C). The projection is per token, so it can
    run after the window reverse. `bias` is `relative_position_bias` (1, heads, N, N);
    `mask` the shift mask (nW, 1, N, N) or None. Every reshape uses the static sizes and
    -1 for the batch, so a traced graph keeps only the batch symbolic.
    """
    # Sizes are Python ints, never read from a tensor's shape: a tracer would record those reads as ops.
    (H, W), (wh, ww), C = resolution, window, dim
    nh, nw, N = H // wh, W // ww, wh * ww
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    one_window = nh == 1 and nw == 1  # the window covers the grid: partition is a plain reshape
    if one_window:
        windows = x.reshape(-1, N, C)
    else:
        windows = x.reshape(-1, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)
    q, k, v = qkv(windows)
    scores = (q * scale) @ k + bias  # (B * nW, heads, N, N)
    if mask is not None:
        scores = (scores.reshape(-1, nh * nw, heads, N, N) + mask).reshape(-1, heads, N, N)
    probs = scores.softmax(dim=-1)
    if dropout is not None:
        probs = dropout(probs)
    mixed = probs @ v  # (B * nW, heads, N, C / heads)
    # Heads back to channels; with one head that is a reshape, which is what the simplifier would make of it.
    mixed = mixed.reshape(-1, N, C) if heads == 1 else mixed.transpose(1, 2)
    if one_window:
        mixed = mixed.reshape(-1, H, W, C)
    else:
        mixed = mixed.reshape(-1, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)
    if any(shift):
        mixed = torch.roll(mixed, shifts=shift, dims=(1, 2))
    return mixed


def block_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`window_attention` of a timm SwinTransformerBlock on x (B, H, W, C) after norm1, in the model."""
    attn = block.attn
    mask = None if block.attn_mask is None else block.attn_mask.unsqueeze(1)
    return window_attention(x, dim=block.dim, resolution=tuple(block.input_resolution), window=tuple(block.window_size),
                            shift=tuple(block.shift_size), heads=attn.num_heads, scale=attn.scale,
                            qkv=fused_qkv(attn), bias=relative_position_bias(attn), mask=mask,
                            dropout=attn.attn_drop)
