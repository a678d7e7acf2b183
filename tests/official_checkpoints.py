"""Write checkpoints in the official MTLoRA on-disk layout, for configurations the fixture lacks."""

from __future__ import annotations

import re
import sys
import types

import torch

from mtlora.config import AdapterConfig, ModelConfig, SwinConfig
from mtlora.model import MultiTaskSwin


class _CfgNode(dict):
    """Pickles as `yacs.config.CfgNode`, like every real upstream checkpoint."""


_CfgNode.__module__ = "yacs.config"
_CfgNode.__qualname__ = "CfgNode"
_CfgNode.__name__ = "CfgNode"


def _node(d: dict) -> _CfgNode:
    return _CfgNode({k: _node(v) if isinstance(v, dict) else v for k, v in d.items()})


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every parameter and BN statistic a random nonzero value, so every branch contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mtl_transform" in name:
                p.copy_(torch.eye(p.shape[0]) + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen) + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def to_official_names(state_dict: dict[str, torch.Tensor], num_stages: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(r"^backbone\.layers\.(\d+)\.downsample\.(.+)$", key)
        if m:
            new = f"backbone.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        new = new.replace(".base.", ".linear.")
        new = re.sub(r"\.lora_([AB])\.shared$", r".lora_shared_\1", new)
        new = re.sub(r"\.lora_([AB])\.(\w+)$", r".lora_tasks_\1.\2", new)
        new = re.sub(r"^downsamplers\.(\w+)\.convs\.(\d+)\.", r"downsampler.\1.downsample_\2.", new)
        new = re.sub(r"^decoders\.", "decoders.decoders.", new)
        out[new] = value
    return out


def save_official(path, checkpoint: dict) -> None:
    """torch.save `checkpoint` with its `config` (a nested dict) pickled as a yacs CfgNode, as upstream does."""
    sys.modules.setdefault("yacs", types.ModuleType("yacs"))
    yacs_config = sys.modules.setdefault("yacs.config", types.ModuleType("yacs.config"))
    yacs_config.CfgNode = _CfgNode
    torch.save({**checkpoint, "config": _node(checkpoint["config"])}, path)


def make_official_checkpoint(path, kind="mtlora", mode="matrix", tasks=("semseg", "human_parts", "sal", "normals"),
                             shared_rank=8, task_rank=4, scale=4.0, img=64, seed=0):
    """Save an official-layout checkpoint; returns (official state dict, reference cfg for official_forward)."""
    config = ModelConfig(
        swin=SwinConfig.from_variant("swin_micro", img_size=img),
        adapter=AdapterConfig(kind=kind, shared_rank=shared_rank, shared_scale=scale, shared_mode=mode,
                              task_rank={t: task_rank for t in tasks}, task_scale={t: scale for t in tasks}),
        tasks=tasks,
    )
    model = MultiTaskSwin(config)
    randomize(model, seed)
    sd = to_official_names(model.state_dict(), config.swin.num_stages)
    n = config.swin.num_stages
    per_stage_r = [{"shared": shared_rank, **{t: task_rank for t in tasks}} for _ in range(n)]
    per_stage_s = [{t: scale for t in tasks} for _ in range(n)]
    cfg = {
        "DATA": {"IMG_SIZE": img},
        "TASKS": list(tasks),
        "MODEL": {
            "TYPE": "swin",
            "SWIN": {"PATCH_SIZE": 4, "IN_CHANS": 3, "EMBED_DIM": 24, "DEPTHS": [2, 2, 2, 2], "NUM_HEADS": [1, 2, 4, 8],
                     "WINDOW_SIZE": 4, "MLP_RATIO": 4.0, "QKV_BIAS": True, "QK_SCALE": None, "APE": False},
            "DECODER_HEAD": {t: "hrnet" for t in tasks},
            "DECODER_CHANNELS": [18, 36, 72, 144],
            "DECODER_DOWNSAMPLER": True,
            "MTLORA": {"ENABLED": True, "R": [shared_rank] * n, "SHARED_SCALE": [scale] * n, "TASK_SCALE": [scale] * n,
                       "SHARED_MODE": "lora_only" if kind == "lora" else mode,
                       "DOWNSAMPLER_ENABLED": kind == "mtlora+", "R_PER_TASK_LIST": per_stage_r,
                       "SCALE_PER_TASK_LIST": per_stage_s, "TRAINABLE_SCALE_SHARED": False,
                       "TRAINABLE_SCALE_PER_TASK": False, "INTERMEDIATE_SPECIALIZATION": False},
        },
    }
    save_official(path, {"model": sd, "config": cfg, "epoch": 0})
    ref_cfg = dict(img=img, patch=4, embed=24, depths=[2, 2, 2, 2], heads=[1, 2, 4, 8], window=4, tasks=list(tasks),
                   mode=mode, shared_scale=scale, task_scale=scale, mtlora=kind != "lora")
    return sd, ref_cfg
