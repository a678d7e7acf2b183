"""Import checkpoints written by the official MTLoRA code (scale-lab/MTLoRA).

An upstream checkpoint is a `torch.save` dict with `model` (state dict) and
`config` (a pickled yacs CfgNode), and usually the optimizer, scheduler and
grad-scaler state, which are read (through the allow-list) and not used. It is
read with the allow-listed unpickler, its config is translated into our
`ModelConfig`, and its parameter names are mapped onto timm's layout (patch
merging moves from the end of stage s to the start of timm's stage s + 1;
`linear` becomes `base`; `lora_shared_*` and `lora_tasks_*` become the `shared`
and task entries of `lora_A` / `lora_B`; `lora_norm` and a learnt
`lora_shared_scale` keep their names; the one shared `downsampler` becomes
`shared_downsampler`). The README lists every official option and what is
done with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mtlora.checkpoint import load_into
from mtlora.config import DECODER_HEADS, LORA_TARGETS, AdapterConfig, ModelConfig, SwinConfig
from mtlora.errors import CheckpointError, ConfigError
from mtlora.safe_pickle import load_allowlisted

# Buffers the official code saves that timm recomputes at construction.
_RECOMPUTED = ("relative_position_index", "attn_mask")


def _get(node: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _per_stage_dicts(values: list[dict], key: str) -> tuple:
    return tuple(stage[key] for stage in values)


# Where each official decoder head keeps its final conv, whose rows are the task's output channels.
_OUTPUT_LAYER = {"hrnet": "last_layer.3", "segformer": "linear_pred", "updecoder": "conv_layers.0", "aspp": "4"}
# The official TRAIN.FREEZE_* flags and our freeze groups.
_FREEZE_FLAGS = {
    "FREEZE_PATCH_EMBED": "patch_embed",
    "FREEZE_LAYER_NORM": "norm",
    "FREEZE_RELATIVE_POSITION_BIAS": "relative_position_bias",
    "FREEZE_DOWNSAMPLE_REDUCTION": "downsample_reduction",
}


def _adapter_config(cfg: dict, tasks: tuple[str, ...]) -> AdapterConfig:
    """The official MODEL.MTLORA (and the options of main.py that decide what trains) as an AdapterConfig."""
    model = _get(cfg, "MODEL", {})
    mt = _get(model, "MTLORA", {})
    if not _get(mt, "ENABLED", False):
        # The official Swin without MTLoRA: full fine-tuning, or decoders only with --freeze-backbone.
        return AdapterConfig(kind="decoders-only" if _get(model, "FREEZE_BACKBONE", False) else "full")
    mode = _get(mt, "SHARED_MODE", "matrix")
    mode = "addition" if mode == "add" else mode
    if mode not in ("matrix", "matrixv2", "addition", "lora_only"):
        raise CheckpointError(f"upstream shared mode '{mode}' is unknown (the official code knows matrix, matrixv2, "
                              "add/addition and lora_only)")
    ranks = _get(mt, "R_PER_TASK_LIST")
    scales = _get(mt, "SCALE_PER_TASK_LIST")
    if not ranks or not scales:
        raise CheckpointError("upstream config lacks R_PER_TASK_LIST / SCALE_PER_TASK_LIST")
    if mode == "lora_only":
        # The official layers then get no tasks: no task adapters, in any block, whatever else is set.
        kind = "lora"
    else:
        kind = "mtlora+" if _get(mt, "DOWNSAMPLER_ENABLED", False) else "mtlora"
        if _get(mt, "TRAINABLE_SCALE_PER_TASK", False):
            raise CheckpointError(
                "upstream config sets MTLORA.TRAINABLE_SCALE_PER_TASK with task adapters, which the official code "
                "cannot build (its MTLoRALinear passes the per-task scale dict to torch.FloatTensor and raises "
                "'must be real number, not dict'), so no trained checkpoint can have it; set it to False"
            )
    targets = tuple(t for t in LORA_TARGETS if _get(mt, f"{t.upper()}_ENABLED", True))
    off = [f"{t.upper()}_ENABLED" for t in ("proj", "fc1", "fc2") if t not in targets]
    if kind != "lora" and off:
        raise CheckpointError(
            f"upstream config sets MTLORA.{', '.join(off)} False with task adapters, which is not supported: the "
            "official model then forms task streams differently (without PROJ the task streams lose their "
            "residual, without FC2 no stream leaves the block); keep proj, fc1 and fc2 enabled"
        )
    train = _get(cfg, "TRAIN", {})
    return AdapterConfig(
        kind=kind,
        shared_rank=_per_stage_dicts(ranks, "shared"),
        shared_scale=tuple(float(s) for s in _get(mt, "SHARED_SCALE")),
        task_rank={t: _per_stage_dicts(ranks, t) for t in tasks} if kind != "lora" else {},
        task_scale={t: _per_stage_dicts(scales, t) for t in tasks} if kind != "lora" else {},
        shared_mode="matrix" if mode == "lora_only" else mode,
        targets=targets,
        shared_scale_trainable=bool(_get(mt, "TRAINABLE_SCALE_SHARED", False)),
        intermediate_specialization=kind != "lora" and bool(_get(mt, "INTERMEDIATE_SPECIALIZATION", False)),
        bias=str(_get(mt, "BIAS", "none")),
        freeze=tuple(group for flag, group in _FREEZE_FLAGS.items() if _get(train, flag, False)),
        freeze_pretrained=bool(_get(mt, "FREEZE_PRETRAINED", True)),
    )


def upstream_config(cfg: dict, state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Translate the official yacs config into our ModelConfig."""
    model = _get(cfg, "MODEL", {})
    if _get(model, "TYPE", "swin") != "swin":
        raise CheckpointError(f"unsupported upstream backbone type '{_get(model, 'TYPE')}'; only Swin v1 is supported")
    swin_cfg = _get(model, "SWIN", {})
    tasks = tuple(_get(cfg, "TASKS", ()))
    if not tasks:
        raise CheckpointError("upstream config names no TASKS")
    mt_enabled = bool(_get(model, "MTLORA.ENABLED", False))
    if mt_enabled and not _get(model, "PER_TASK_DOWNSAMPLER", True):
        raise CheckpointError(
            "upstream config sets PER_TASK_DOWNSAMPLER False with MTLoRA enabled, which the official model cannot "
            "run (its forward indexes the one shared Downsampler by task: \"'Downsampler' object is not "
            "subscriptable\"), so no trained checkpoint can have it"
        )
    all_heads = _get(model, "DECODER_HEAD", {}) or {}
    # The official get_head builds ASPP for any name it does not know.
    heads = {t: all_heads.get(t, "hrnet") if all_heads.get(t, "hrnet") in DECODER_HEADS else "aspp" for t in tasks}

    channels = {}
    for task in tasks:
        key = f"decoders.decoders.{task}.{_OUTPUT_LAYER[heads[task]]}.weight"
        if key not in state_dict:
            raise CheckpointError(f"upstream checkpoint has no {heads[task]} decoder for task '{task}'")
        channels[task] = int(state_dict[key].shape[0])

    swin = SwinConfig(
        img_size=int(_get(cfg, "DATA.IMG_SIZE", 224)),
        patch_size=int(_get(swin_cfg, "PATCH_SIZE", 4)),
        in_chans=int(_get(swin_cfg, "IN_CHANS", 3)),
        embed_dim=int(_get(swin_cfg, "EMBED_DIM", 96)),
        depths=tuple(_get(swin_cfg, "DEPTHS", (2, 2, 6, 2))),
        num_heads=tuple(_get(swin_cfg, "NUM_HEADS", (3, 6, 12, 24))),
        window_size=int(_get(swin_cfg, "WINDOW_SIZE", 7)),
        mlp_ratio=float(_get(swin_cfg, "MLP_RATIO", 4.0)),
        qkv_bias=bool(_get(swin_cfg, "QKV_BIAS", True)),
        qk_scale=None if _get(swin_cfg, "QK_SCALE") in (None, "") else float(_get(swin_cfg, "QK_SCALE")),
        patch_norm=bool(_get(swin_cfg, "PATCH_NORM", True)),
        ape=bool(_get(swin_cfg, "APE", False)),
    )
    try:
        return ModelConfig(
            swin=swin,
            adapter=_adapter_config(cfg, tasks),
            tasks=tasks,
            task_channels=channels,
            decoder_channels=tuple(_get(model, "DECODER_CHANNELS", (18, 36, 72, 144))),
            decoder_heads=heads,
            segformer_channels=int(_get(model, "SEGFORMER_CHANNELS", 256)),
            decoder_downsampler=bool(_get(model, "DECODER_DOWNSAMPLER", True)),
            per_task_downsampler=bool(_get(model, "PER_TASK_DOWNSAMPLER", True)),
        )
    except ConfigError as err:
        raise CheckpointError(f"upstream config cannot be represented: {err}") from None


_BLOCK = re.compile(r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_MERGING = re.compile(r"^backbone\.layers\.(\d+)\.downsample\.(.+)$")
_ADAPTED = re.compile(r"^(.*)\.(linear\.(weight|bias)|lora_shared_[AB]|lora_tasks_[AB]\.\w+)$")


def _adapter_name(name: str) -> str:
    """Official MTLoRALinear names to ours: linear->base, lora_shared_A->lora_A.shared, ..."""
    match = _ADAPTED.match(name)
    if not match:
        return name
    prefix, leaf = match.group(1), match.group(2)
    if leaf.startswith("linear."):
        return f"{prefix}.base.{leaf.split('.', 1)[1]}"
    if leaf.startswith("lora_shared_"):
        return f"{prefix}.lora_{leaf[-1]}.shared"
    matrix, task = leaf[len("lora_tasks_"):].split(".", 1)
    return f"{prefix}.lora_{matrix}.{task}"


def map_state_dict(state_dict: dict[str, torch.Tensor], wrapped: set[str]) -> dict[str, torch.Tensor]:
    """Rename official parameters to ours.

    Args:
        wrapped: module names in our model that are adapter layers (their Linear is `base`).
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_RECOMPUTED) or key.startswith("backbone.head."):
            continue
        new = key
        if m := _BLOCK.match(key):
            new = f"backbone.layers.{m.group(1)}.blocks.{m.group(2)}.{_adapter_name(m.group(3))}"
        elif m := _MERGING.match(key):
            new = f"backbone.layers.{int(m.group(1)) + 1}.downsample.{_adapter_name(m.group(2))}"
        elif m := re.match(r"^downsampler\.(\w+)\.downsample_(\d+)\.weight$", key):
            new = f"downsamplers.{m.group(1)}.convs.{m.group(2)}.weight"
        elif m := re.match(r"^downsampler\.downsample_(\d+)\.weight$", key):
            new = f"shared_downsampler.convs.{m.group(1)}.weight"
        elif key.startswith("decoders.decoders."):
            new = "decoders." + key[len("decoders.decoders."):]
        # A plain Linear in the official model (CompatLinear) that we wrapped anyway keeps its name.
        module, _, leaf = new.rpartition(".")
        if module in wrapped and leaf in ("weight", "bias"):
            new = f"{module}.base.{leaf}"
        mapped[new] = value
    return mapped


def read_upstream(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    checkpoint = load_allowlisted(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(
            f"{path}: not an official MTLoRA checkpoint (expected a dict with 'model' and 'config')"
        )
    state_dict = checkpoint["model"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    return upstream_config(checkpoint["config"], state_dict), state_dict


def import_upstream(path: str | Path):
    """Build our MultiTaskSwin from an official MTLoRA checkpoint (eval mode)."""
    from mtlora.adapters import LoRALinear
    from mtlora.model import MultiTaskSwin

    config, state_dict = read_upstream(path)
    model = MultiTaskSwin(config)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    load_into(model, map_state_dict(state_dict, wrapped), str(path))
    return model.eval()
