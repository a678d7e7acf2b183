"""Pretrained Swin backbones from local files, in timm's and Microsoft's layouts."""

import re

import pytest
import torch
from safetensors.torch import save_file

from mtlora.config import AdapterConfig, ModelConfig, SwinConfig
from mtlora.errors import CheckpointError
from mtlora.model import MultiTaskSwin, build_swin
from mtlora.pretrained import load_pretrained_backbone


def _config(img=64, window=4, kind="mtlora"):
    return ModelConfig(swin=SwinConfig.from_variant("swin_micro", img_size=img, window_size=window),
                       adapter=AdapterConfig(kind=kind, shared_rank=4), tasks=("semseg", "sal"))


def _imagenet_backbone(img=64, window=4):
    torch.manual_seed(0)
    backbone = build_swin(_config(img, window))
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(0, 0.05)
    return backbone


def _to_microsoft_layout(state_dict):
    # The original Swin code keeps patch merging at the end of a stage and the classifier as `head`.
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    out["norm.weight"] = torch.ones(192)
    out["norm.bias"] = torch.zeros(192)
    out["head.weight"] = torch.zeros(1000, 192)
    out["head.bias"] = torch.zeros(1000)
    return {"model": out}


def test_timm_safetensors_backbone_loads_exactly(tmp_path):
    source = _imagenet_backbone()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    model = MultiTaskSwin(_config())
    left = load_pretrained_backbone(model, tmp_path / "swin.safetensors")
    assert left and all("lora_" in k for k in left)
    ours = model.backbone.state_dict()
    assert torch.equal(ours["layers.1.blocks.0.attn.qkv.base.weight"], source.state_dict()["layers.1.blocks.0.attn.qkv.weight"])
    assert torch.equal(ours["layers.2.downsample.reduction.weight"], source.state_dict()["layers.2.downsample.reduction.weight"])


def test_microsoft_layout_at_another_size_is_converted_and_resized(tmp_path):
    # A checkpoint made at 32x32 with window 2 runs in a 64x64 model with window 4, as MTLoRA runs 224 at 448.
    source = _imagenet_backbone(img=32, window=2)
    torch.save(_to_microsoft_layout(source.state_dict()), tmp_path / "swin_ms.pth")
    model = MultiTaskSwin(_config(img=64, window=4))
    load_pretrained_backbone(model, tmp_path / "swin_ms.pth")
    table = model.backbone.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (49, 1)
    assert torch.equal(model.backbone.state_dict()["layers.1.downsample.norm.weight"],
                       source.state_dict()["layers.1.downsample.norm.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))[0]).all()


def test_wrong_variant_is_refused(tmp_path):
    torch.manual_seed(0)
    other = build_swin(ModelConfig(swin=SwinConfig.from_variant("swin_micro", img_size=64, embed_dim=32),
                                   tasks=("sal",)))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="check the variant"):
        load_pretrained_backbone(MultiTaskSwin(_config()), tmp_path / "other.safetensors")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such pretrained"):
        load_pretrained_backbone(MultiTaskSwin(_config()), tmp_path / "nope.pth")
