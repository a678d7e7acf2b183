"""The multi-task Swin Transformer with MTLoRA adapters.

The backbone is timm's `SwinTransformer`; adapters replace its Linear layers.
The official MTLoRA model orders a stage as blocks-then-patch-merging, while
timm puts the merging at the start of the next stage, so the forward pass walks
timm's stages itself: blocks of stage s, then the merging held by stage s + 1.

In the last block of each stage the task-specific layers (proj, fc1, fc2) turn
one shared stream into one stream per task; each task stream goes through the
stage's patch merging and becomes that task's feature at this scale. The shared
stream alone continues into the next stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn

from mtlora.adapters import LoRALinear, MTLLoRALinear, TaskLoRALinear, check_adaptable, is_adapter_parameter
from mtlora.attention import block_attention
from mtlora.config import TASK_SPECIFIC_TARGETS, ModelConfig
from mtlora.decoders import build_decoder
from mtlora.errors import ConfigError
from mtlora.heads import FeatureDownsampler, FeatureLayout

# Where each LoRA target lives inside a timm SwinTransformerBlock.
TARGET_PATHS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}


def build_swin(config: ModelConfig) -> SwinTransformer:
    swin = config.swin
    backbone = SwinTransformer(
        img_size=swin.img_size,
        patch_size=swin.patch_size,
        in_chans=swin.in_chans,
        num_classes=0,
        global_pool="",
        embed_dim=swin.embed_dim,
        depths=swin.depths,
        num_heads=swin.num_heads,
        window_size=swin.window_size,
        mlp_ratio=swin.mlp_ratio,
        qkv_bias=swin.qkv_bias,
        drop_path_rate=swin.drop_path_rate,
    )
    # MTLoRA's decoders read the stage outputs directly; timm's final norm is unused.
    backbone.norm = nn.Identity()
    if not swin.patch_norm:
        backbone.patch_embed.norm = nn.Identity()
    if swin.qk_scale is not None:
        for stage in backbone.layers:
            for block in stage.blocks:
                block.attn.scale = swin.qk_scale
                block.attn.fused_attn = False  # PyTorch's fused attention would use head_dim ** -0.5
    if swin.ape:
        tokens = swin.stage_resolution(0) ** 2
        backbone.absolute_pos_embed = nn.Parameter(torch.zeros(1, tokens, swin.embed_dim))
    return backbone


def embed_patches(backbone: SwinTransformer, image: torch.Tensor) -> torch.Tensor:
    """Patch embedding (and the absolute position embedding, if any): (B, 3, H, W) -> (B, h, w, C)."""
    x = backbone.patch_embed(image)
    ape = getattr(backbone, "absolute_pos_embed", None)
    return x if ape is None else x + ape.view(1, *x.shape[1:])


def _replace(parent: nn.Module, child: str, make) -> None:
    layer = check_adaptable(getattr(parent, child), child)
    setattr(parent, child, make(layer))


def inject_adapters(backbone: SwinTransformer, config: ModelConfig) -> None:
    """Wrap the backbone's Linear layers with the adapters `config.adapter` asks for."""
    adapter = config.adapter
    if not adapter.has_adapters:
        return
    if adapter.has_task_streams:
        missing = [t for t in TASK_SPECIFIC_TARGETS if t not in adapter.targets]
        if missing:
            raise ConfigError(f"task-specific adapters need LoRA on {', '.join(TASK_SPECIFIC_TARGETS)}; missing {missing}")
    num_stages = config.swin.num_stages
    trainable_scale = adapter.shared_scale_trainable
    for s, stage in enumerate(backbone.layers):
        rank, scale = adapter.shared_rank[s], adapter.shared_scale[s]
        for j, block in enumerate(stage.blocks):
            task_block = adapter.has_task_adapters(j, len(stage.blocks))
            for target in adapter.targets:
                owner_name, child = TARGET_PATHS[target]
                owner = getattr(block, owner_name)
                if task_block and target in TASK_SPECIFIC_TARGETS:
                    ranks = {t: adapter.task_rank[t][s] for t in config.tasks}
                    scales = {t: adapter.task_scale[t][s] for t in config.tasks}
                    if adapter.task_adapter == "mtl-lora":
                        def make(base, r=rank, sc=scale, rs=ranks, ss=scales):
                            return MTLLoRALinear(base, r, sc, rs, ss, adapter.shared_mode, adapter.dropout,
                                                 trainable_scale, num_up=adapter.mtl_num_up,
                                                 temperature=adapter.mtl_temperature)
                    else:
                        def make(base, r=rank, sc=scale, rs=ranks, ss=scales):
                            return TaskLoRALinear(base, r, sc, rs, ss, adapter.shared_mode, adapter.dropout,
                                                  trainable_scale)
                else:
                    def make(base, r=rank, sc=scale):
                        return LoRALinear(base, r, sc, adapter.dropout, trainable_scale)
                _replace(owner, child, make)
        # MTLoRA+: LoRA on the patch merging that closes stage s (timm keeps it in stage s + 1).
        if adapter.patch_merging_lora and s < num_stages - 1:
            merging = backbone.layers[s + 1].downsample
            _replace(merging, "reduction",
                     lambda base, r=rank, sc=scale: LoRALinear(base, r, sc, adapter.dropout, trainable_scale))


def task_block_forward(
    block: SwinTransformerBlock, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The last block of a stage: the shared output and one output stream per task.

    x: (B, H, W, C). Returns the shared stream and {task: (B, H, W, C)}.
    """
    attn, mlp = block.attn, block.mlp
    mixed = block_attention(block, block.norm1(x))
    shared, tasks = attn.proj.forward_tasks(mixed)
    x_attn = x + block.drop_path1(attn.proj_drop(shared))
    task_attn = {t: x + block.drop_path1(attn.proj_drop(v)) for t, v in tasks.items()}

    hidden, task_hidden = mlp.fc1.forward_tasks(block.norm2(x_attn), {t: block.norm2(v) for t, v in task_attn.items()})
    hidden = mlp.norm(mlp.drop1(mlp.act(hidden)))
    task_hidden = {t: mlp.norm(mlp.drop1(mlp.act(v))) for t, v in task_hidden.items()}
    out, task_out = mlp.fc2.forward_tasks(hidden, task_hidden)
    x_out = x_attn + block.drop_path2(mlp.drop2(out))
    task_streams = {t: task_attn[t] + block.drop_path2(mlp.drop2(task_out[t])) for t in task_out}
    return x_out, task_streams


class MultiTaskSwin(nn.Module):
    """A Swin backbone with (MT)LoRA adapters, per-task downsamplers and decoder heads (HRNet by default).

    forward(image: (B, 3, H, W)) -> tuple of per-task outputs (B, C_task, H, W) in
    the order of `config.tasks`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tasks = tuple(config.tasks)
        self.backbone = build_swin(config)
        inject_adapters(self.backbone, config)
        dims = config.swin.stage_dims()
        channels = config.decoder_input_channels()
        if config.per_task_downsampler:
            self.downsamplers = nn.ModuleDict({
                t: FeatureDownsampler(dims, channels) if config.decoder_downsampler else FeatureLayout()
                for t in self.tasks
            })
        else:
            # One downsampler for every task (the official PER_TASK_DOWNSAMPLER off), always with its convs.
            self.downsamplers = nn.ModuleDict()
            self.shared_downsampler = FeatureDownsampler(dims, channels)
        self.decoders = nn.ModuleDict({
            t: build_decoder(config.decoder_head(t), channels, config.task_channels[t], config.segformer_channels)
            for t in self.tasks
        })
        self.out_size = (config.swin.img_size, config.swin.img_size)
        set_trainable(self)

    @property
    def has_task_streams(self) -> bool:
        return self.config.adapter.has_task_streams

    def downsampler(self, task: str) -> nn.Module:
        """The module that turns the backbone features into what `task`'s decoder reads."""
        return self.downsamplers[task] if task in self.downsamplers else self.shared_downsampler

    def forward_features(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Per-task multi-scale features, NHWC, one per stage (after that stage's patch merging)."""
        stages = self.backbone.layers
        x = embed_patches(self.backbone, image)
        features: dict[str, list[torch.Tensor]] = {t: [] for t in self.tasks}
        adapter = self.config.adapter
        # With task adapters in every block and `addition`, a block's shared output depends on its task
        # streams, which then end with the block; otherwise the other blocks' task adapters are unreachable.
        inner_streams = adapter.intermediate_specialization and adapter.shared_mode == "addition"
        for s, stage in enumerate(stages):
            blocks = list(stage.blocks)
            if self.has_task_streams:
                for block in blocks[:-1]:
                    x = task_block_forward(block, x)[0] if inner_streams else block(x)
                x, task_streams = task_block_forward(blocks[-1], x)
            else:
                for block in blocks:
                    x = block(x)
                task_streams = None
            if s < len(stages) - 1:
                merging = stages[s + 1].downsample
                if task_streams is None:
                    x = merging(x)
                else:
                    # One merging call for the shared and every task stream, stacked on the batch axis.
                    merged = merging(torch.cat([x] + [task_streams[t] for t in self.tasks], dim=0))
                    x, *streams = merged.chunk(len(self.tasks) + 1, dim=0)
                    task_streams = dict(zip(self.tasks, streams, strict=True))
            for t in self.tasks:
                features[t].append(x if task_streams is None else task_streams[t])
        return features

    def decode(self, task: str, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.decoders[task](self.downsampler(task)(features))
        return F.interpolate(out, size=self.out_size, mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.forward_features(image)
        return tuple(self.decode(t, features[t]) for t in self.tasks)

    def predict(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.tasks, self.forward(image), strict=True))


# The backbone parameter groups MTLoRA trains besides the adapters, by name substring (as the official
# `mark_only_lora_as_trainable` matches them), each with the TRAIN.FREEZE_* group that turns it off.
_TRAINED_GROUPS = (
    ("patch_embed", "patch_embed"),
    ("norm", "norm"),
    ("downsample.reduction", "downsample_reduction"),
    ("relative_position_bias_table", "relative_position_bias"),
)


def _backbone_trainable(name: str, config: ModelConfig) -> bool:
    """The official MTLoRA rule (`mark_only_lora_as_trainable` as main.py calls it) for backbone parameters.

    Names match the official ones where it matters: every adapter parameter carries `lora_`, and
    timm's names contain `patch_embed`, `norm`, `downsample.reduction`, `relative_position_bias_table`
    and `bias` exactly where the official model's do.
    """
    adapter = config.adapter
    if not adapter.freeze_pretrained:
        return True
    if is_adapter_parameter(name):
        return True
    frozen = set(adapter.freeze)
    if adapter.kind == "mtlora+":
        frozen.add("downsample_reduction")  # main.py freezes it: MTLoRA+ adapts it with LoRA instead
    if any(key in name and group not in frozen for key, group in _TRAINED_GROUPS):
        return True
    # MTLORA.BIAS "all" frees every parameter with "bias" in its name (the position bias table included);
    # "lora_only" frees the bias of LoRA layers holding one themselves, which no layer here does.
    return adapter.bias == "all" and "bias" in name


def set_trainable(model: MultiTaskSwin) -> None:
    kind = model.config.adapter.kind
    for name, param in model.backbone.named_parameters():
        if kind in ("full", "single-task"):
            param.requires_grad = True
        elif kind == "decoders-only":
            param.requires_grad = False
        else:
            param.requires_grad = _backbone_trainable(name, model.config)
    for name, param in model.named_parameters():
        if not name.startswith("backbone."):
            param.requires_grad = True
