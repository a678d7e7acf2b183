"""Export-time form of a merged MultiTaskSwin: what gets traced into ONNX.

`ExportModel` takes over the modules of a merged model (pass it a copy) and
rewrites the parts that matter for deployment:

- Every Linear becomes a MatMul against a stored (in, out) weight, so each
  ONNX initializer keeps a readable name instead of a folded transpose.
  Attention's fused qkv projection becomes three (q, k, v), each reshaped
  straight into the layout its MatMul reads, so no stacked qkv is split;
  the key's bias is dropped, as the softmax cancels it.
- A task layer (proj / fc1 / fc2 of a stage's last block) becomes
  `TaskAnchorLinear` on the shared stream plus one `TaskFactors` pair per task.
  The anchor every task adds its low-rank term to is W x: W' x for `matrixv2`,
  and W' x - s B A x for `matrix`, so no task holds a full-rank weight.
- The task streams of the whole model run stacked, (T, tokens, C), with every
  task's factors stacked into one tensor (`StackedTaskFactors`): norm2, GELU,
  the anchor adds and each low-rank MatMul are one node for all tasks instead
  of one per task, and the stack goes through patch merging without a Concat.
  The attention projection's tasks share its input, so their down factors are
  concatenated into one (C, T r) MatMul.
- MTL-LoRA's task terms are folded into plain (down, up) factors; the
  down-projection is shared, so A x is computed once for the attention
  projection and in one MatMul over the stacked task streams for fc1 / fc2.
- The decoder's BatchNorm is folded into its convolution (HRNet heads; the
  SegFormer, up-convolution and ASPP heads are traced as they are).
- `addition` mode (`AdditionTaskLinear`): there is nothing task-agnostic to fold,
  and the shared stream is W x + b + LayerNorm(sum of the task outputs), so it
  needs every task stream: the backbone computes all of them, stacked, and the
  split layout's backbone hands each head its task's features.
- With task adapters in every block (INTERMEDIATE_SPECIALIZATION), a block other
  than the last of a stage passes only its shared stream on. In `matrix` and
  `matrixv2` mode its task adapters cannot reach an output and are dropped
  (`dropped_parameters` counts them); in `addition` mode they can, and stay.

Initializer names follow one scheme that `export.onnx.cost` reads: task-specific
tensors live under `task_branches.<task>.` and `heads.<task>.`, the stacked
factors of all tasks under `task_stack.` (leading axis, or the proj down
factor's column blocks, in task order), every low-rank factor has `lora_` in
its name, everything else is shared.

The same module traces three graphs (`role`): the whole model, the shared
backbone of the split layout, or one task's head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from export.errors import ExportError
from mtlora.adapters import SHARED, LoRALinear, MTLLoRALinear, TaskLoRALinear
from mtlora.attention import relative_position_bias, window_attention
from mtlora.heads import HRNetHead
from mtlora.model import TARGET_PATHS, MultiTaskSwin
from mtlora.tasks import NORMALIZE_EPS, get_task

TASK_TARGETS = ("proj", "fc1", "fc2")


def _frozen(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().contiguous().clone()


class MatMulLinear(nn.Module):
    """y = x @ W^T + b with W^T stored as (in, out): the initializer keeps its name in ONNX."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_t", _frozen(weight.t()))
        self.register_buffer("bias", None if bias is None else _frozen(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class TaskAnchorLinear(nn.Module):
    """A merged task layer on the shared stream: returns (shared output, task anchor).

    The anchor is what every task adds its own low-rank term to. `matrix` mode
    needs the frozen W x, recovered as W' x - s B A x with the sign and scale
    folded into `lora_correction_up`; `matrixv2` uses W' x itself.
    """

    def __init__(self, layer: TaskLoRALinear):
        super().__init__()
        if not layer.merged:
            raise ExportError("internal: task layers must be merged before folding")
        self.linear = MatMulLinear(layer.base.weight, layer.base.bias)
        if layer.shared_mode == "matrix":
            self.register_buffer("lora_correction_down", _frozen(layer.lora_A[SHARED].t()))  # (in, r)
            up = -layer.scale_of(SHARED) * layer.lora_B[SHARED].float()
            self.register_buffer("lora_correction_up", _frozen(up.t()))  # (r, out)
        else:
            self.register_buffer("lora_correction_down", None)
            self.register_buffer("lora_correction_up", None)
        # MTL-LoRA: the down-projection every task shares.
        shared_down = layer.lora_mtl_A.t() if isinstance(layer, MTLLoRALinear) else None
        self.register_buffer("lora_shared_down", None if shared_down is None else _frozen(shared_down))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.linear(x)
        if self.lora_correction_down is None:
            return shared, shared
        return shared, shared + torch.matmul(torch.matmul(x, self.lora_correction_down), self.lora_correction_up)


class TaskFactors(nn.Module):
    """One task's low-rank term up @ (down @ x), scale folded into `lora_up`: what a task's head graph uses.

    Without its own down-projection (MTL-LoRA) the input is already A x.
    """

    def __init__(self, down: torch.Tensor | None, up: torch.Tensor):
        super().__init__()
        self.register_buffer("lora_down", None if down is None else _frozen(down.t()))  # (in, r)
        self.register_buffer("lora_up", _frozen(up.t()))  # (r, out)


def _pad_rank(factors: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """Zero-pad every task's factor to the largest rank along `dim`, so they stack; zero rank adds nothing."""
    rank = max(f.shape[dim] for f in factors)
    return [F.pad(f, (0, rank - f.shape[dim]) if dim == -1 else (0, 0, 0, rank - f.shape[dim])) for f in factors]


class StackedTaskFactors(nn.Module):
    """The factors of one task layer for all tasks, in task order, for the stacked task streams.

    `lora_up` is (T, r, out). `lora_down` is (T, in, r), or, when every task reads
    the same input (`shared_input`: the attention projection), the down factors side
    by side as (in, T r): one MatMul whose columns are then split into the T rank-r
    inputs. None with MTL-LoRA's shared down-projection.
    """

    def __init__(self, factors: Sequence[TaskFactors], shared_input: bool):
        super().__init__()
        downs = None if factors[0].lora_down is None else _pad_rank([f.lora_down for f in factors], -1)
        if downs is not None:
            downs = torch.cat(downs, dim=1) if shared_input else torch.stack(downs)
        self.register_buffer("lora_down", downs)
        self.register_buffer("lora_up", torch.stack(_pad_rank([f.lora_up for f in factors], 0)))
        self.shared_input = shared_input


def _split_qkv(qkv: MatMulLinear) -> tuple[MatMulLinear, MatMulLinear, MatMulLinear]:
    """timm's fused qkv projection as three (C, C) projections, the key's bias dropped.

    The key bias adds q . b_k to every score of a query row, a constant per row, which the
    softmax over that row cancels exactly; without it the graph has one Add fewer per block.
    """
    weights = qkv.weight_t.t().chunk(3)
    biases = [None] * 3 if qkv.bias is None else list(qkv.bias.chunk(3))
    biases[1] = None
    return tuple(MatMulLinear(w, b) for w, b in zip(weights, biases, strict=True))


class ExportSwinBlock(nn.Module):
    """timm's SwinTransformerBlock (eval) at its fixed resolution.

    The TorchScript tracer records every `x.shape` read as Shape/Gather ops; here
    every reshape uses the static sizes and -1 for the batch, so the batch is the
    only symbolic dimension and the graph has almost no shape arithmetic. The
    relative position bias and the shift mask become named initializers.
    """

    def __init__(self, block: SwinTransformerBlock):
        super().__init__()
        attn = block.attn
        self.resolution = tuple(block.input_resolution)
        self.window_size = tuple(block.window_size)
        self.shift_size = tuple(block.shift_size)
        self.dim = block.dim
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.q, self.k, self.v = _split_qkv(attn.qkv)
        self.proj = attn.proj
        self.mlp = block.mlp
        with torch.no_grad():
            self.register_buffer("rel_pos_bias", _frozen(relative_position_bias(attn)))  # (1, heads, N, N)
            mask = None if block.attn_mask is None else _frozen(block.attn_mask.unsqueeze(1))  # (nW, 1, N, N)
        self.register_buffer("attn_mask", mask)

    def _qkv(self, windows: torch.Tensor):
        """q, k^T and v each straight into the layout their MatMul wants: no (3, ...) stack to split."""
        N, C, heads = self.window_size[0] * self.window_size[1], self.dim, self.num_heads
        q = self.q(windows).reshape(-1, N, heads, C // heads).transpose(1, 2)  # (B * nW, heads, N, C / heads)
        k = self.k(windows).reshape(-1, N, heads, C // heads).permute(0, 2, 3, 1)  # (B * nW, heads, C / heads, N)
        v = self.v(windows).reshape(-1, N, heads, C // heads).transpose(1, 2)
        return q, k, v

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Shifted-window attention up to, not including, the output projection (`mtlora.attention`)."""
        return window_attention(x, dim=self.dim, resolution=self.resolution, window=self.window_size, shift=self.shift_size,
                                heads=self.num_heads, scale=self.scale, qkv=self._qkv, bias=self.rel_pos_bias,
                                mask=self.attn_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(self.mix(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class ExportPatchMerging(nn.Module):
    """timm's PatchMerging at a fixed resolution: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, merging: nn.Module, resolution: tuple[int, int], dim: int):
        super().__init__()
        self.resolution, self.dim = resolution, dim
        self.norm, self.reduction = merging.norm, merging.reduction
        out_dim = self.reduction.weight_t.shape[1]
        self.out_shape = (resolution[0] // 2, resolution[1] // 2, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (H, W), C = self.resolution, self.dim
        x = x.reshape(-1, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(-1, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class ExportStage(nn.Module):
    """A stage's blocks and the patch merging that closes it (timm keeps it in the next stage)."""

    def __init__(self, blocks: list[ExportSwinBlock], merging: ExportPatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.merging = merging


class ExportBackbone(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        embed = backbone.patch_embed
        self.patch_embed = nn.ModuleDict({"proj": embed.proj, "norm": embed.norm})
        ape = getattr(backbone, "absolute_pos_embed", None)  # (1, h w, C), official APE
        self.register_buffer("absolute_pos_embed", None if ape is None else _frozen(
            ape.reshape(1, *embed.grid_size, ape.shape[-1])))
        stages = []
        for s, stage in enumerate(backbone.layers):
            blocks = [ExportSwinBlock(b) for b in stage.blocks]
            merging = None
            if s + 1 < len(backbone.layers):
                first = blocks[0]
                merging = ExportPatchMerging(backbone.layers[s + 1].downsample, first.resolution, first.dim)
            stages.append(ExportStage(blocks, merging))
        self.stages = nn.ModuleList(stages)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) -> tokens (B, H/p, W/p, C)."""
        x = self.patch_embed["norm"](self.patch_embed["proj"](image).permute(0, 2, 3, 1))
        return x if self.absolute_pos_embed is None else x + self.absolute_pos_embed


class TaskHead(nn.Module):
    """A task's downsampler and HRNet decoder (BatchNorm folded), upsampled to the input size.

    Upsampling uses the (integer) scale factors rather than target sizes, so the
    Resize nodes need no shape arithmetic; for integer factors both give the same
    sampling grid.
    """

    def __init__(self, downsampler: nn.Module, decoder: HRNetHead, resolutions: list[int],
                 out_size: int):
        super().__init__()
        conv, bn, act, classifier = decoder.last_layer
        self.downsampler = downsampler
        self.decoder = nn.Sequential(fuse_conv_bn_eval(conv.eval(), bn.eval()), act, classifier)
        if any(resolutions[0] % r for r in resolutions) or out_size % resolutions[0]:
            raise ExportError(f"internal: feature resolutions {resolutions} are not integer multiples")
        self.feature_scales = [float(resolutions[0] // r) for r in resolutions[1:]]
        self.out_scale = float(out_size // resolutions[0])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = self.downsampler(features)
        up = [maps[0]] + [
            F.interpolate(m, scale_factor=scale, mode="bilinear", align_corners=False)
            for m, scale in zip(maps[1:], self.feature_scales, strict=True)
        ]
        out = self.decoder(torch.cat(up, dim=1))
        return F.interpolate(out, scale_factor=self.out_scale, mode="bilinear", align_corners=False)


class DecoderTaskHead(nn.Module):
    """A task's downsampler and a SegFormer, up-convolution or ASPP decoder (as trained), resized to the input size.

    The decoder's output size follows from the feature sizes, so it is measured once here and the final
    resize uses a fixed scale factor (below 1 for the up-convolution head, whose output is larger).
    """

    def __init__(self, downsampler: nn.Module, decoder: nn.Module, feature_shapes: list[tuple[int, int, int]],
                 out_size: int):
        super().__init__()
        self.downsampler = downsampler
        self.decoder = decoder.eval()
        with torch.no_grad():
            probe = [torch.zeros(1, *shape) for shape in feature_shapes]
            decoded = self.decoder(self.downsampler(probe)).shape[-1]
        self.out_scale = out_size / decoded

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.decoder(self.downsampler(features))
        return F.interpolate(out, scale_factor=self.out_scale, mode="bilinear", align_corners=False)


class AdditionTaskLinear(TaskAnchorLinear):
    """An `addition` task layer: W x + b for every task to add its term to, and the LayerNorm that turns the
    sum of the task outputs into the shared output's update."""

    def __init__(self, layer: TaskLoRALinear):
        super().__init__(layer)
        self.lora_norm = layer.lora_norm

    def shared_output(self, anchor: torch.Tensor, task_outputs: torch.Tensor) -> torch.Tensor:
        """anchor (M, out) and the stacked task outputs (T, M, out) -> the shared output (M, out)."""
        return anchor + self.lora_norm(task_outputs.sum(dim=0))


def _task_parameters(layer: TaskLoRALinear) -> int:
    return sum(layer.lora_A[t].numel() + layer.lora_B[t].numel() for t in layer.tasks)


def swap_linears(module: nn.Module) -> None:
    """Replace every remaining (merged) LoRALinear and nn.Linear with a MatMulLinear."""
    for name, child in module.named_children():
        if isinstance(child, TaskLoRALinear):
            raise ExportError(f"internal: task layer '{name}' was not folded")
        if isinstance(child, LoRALinear):
            if not child.merged:
                raise ExportError("internal: adapters must be merged before folding")
            setattr(module, name, MatMulLinear(child.base.weight, child.base.bias))
        elif type(child) is nn.Linear:
            setattr(module, name, MatMulLinear(child.weight, child.bias))
        else:
            swap_linears(child)


class ExportModel(nn.Module):
    """The traceable form of a merged model, for the given tasks (in config order).

    Args:
        model: a merged MultiTaskSwin in eval mode; its modules are taken over.
        tasks: the tasks whose branches and heads to keep.
    """

    def __init__(self, model: MultiTaskSwin, tasks: Sequence[str], postprocess: bool = False):
        super().__init__()
        config = model.config
        self.tasks = tuple(tasks)
        # In-graph post-processing (the op its kind's row names, `mtlora.tasks.TaskKind.postprocess`): what a
        # device application wants, and far less to copy out than full-resolution logits.
        self.postprocess = {t: get_task(t).spec.postprocess if postprocess else "none" for t in self.tasks}
        self.num_stages = config.swin.num_stages
        self.has_task_streams = model.has_task_streams
        self.shared_down = self.has_task_streams and config.adapter.task_adapter == "mtl-lora"
        self.role: tuple[str, str | None] = ("model", None)
        # Task adapters that cannot reach an output (INTERMEDIATE_SPECIALIZATION, matrix modes), dropped here.
        self.dropped_parameters = 0
        self.addition = self.has_task_streams and config.adapter.shared_mode == "addition"
        if self.addition:
            self._init_addition(model, config)
            return
        branches: dict[str, nn.ModuleList] = {t: nn.ModuleList() for t in self.tasks}
        stacks = nn.ModuleList()
        if self.has_task_streams:
            self._drop_unreachable(model)
            for stage in model.backbone.layers:
                last = stage.blocks[-1]
                per_task = {t: nn.ModuleDict() for t in self.tasks}
                for target in TASK_TARGETS:
                    owner_name, child = TARGET_PATHS[target]
                    owner = getattr(last, owner_name)
                    layer = getattr(owner, child)
                    for t in self.tasks:
                        down, up = layer.folded_task_factors(t)
                        per_task[t][target] = TaskFactors(None if self.shared_down else down, up)
                    setattr(owner, child, TaskAnchorLinear(layer))
                for t in self.tasks:
                    branches[t].append(per_task[t])
                stacks.append(nn.ModuleDict({
                    target: StackedTaskFactors([per_task[t][target] for t in self.tasks], target == "proj")
                    for target in TASK_TARGETS
                }))
        swap_linears(model.backbone)
        self.backbone = ExportBackbone(model.backbone)
        self.task_branches = nn.ModuleDict(branches if self.has_task_streams else {})
        self.task_stack = stacks  # used by the whole-model graph; a head graph uses its task's branch
        self.heads = self._make_heads(model)
        self.eval()

    def _make_heads(self, model: MultiTaskSwin) -> nn.ModuleDict:
        config = model.config
        resolutions = config.swin.feature_resolutions()
        shapes = list(zip(resolutions, resolutions, config.swin.stage_dims(), strict=True))

        def head(t: str) -> nn.Module:
            if isinstance(model.decoders[t], HRNetHead):
                return TaskHead(model.downsampler(t), model.decoders[t], resolutions, config.swin.img_size)
            return DecoderTaskHead(model.downsampler(t), model.decoders[t], shapes, config.swin.img_size)

        return nn.ModuleDict({t: head(t) for t in self.tasks})

    def _drop_unreachable(self, model: MultiTaskSwin) -> None:
        """Blocks before the last of a stage pass only their shared stream on: their task adapters go."""
        for stage in model.backbone.layers:
            for block in list(stage.blocks)[:-1]:
                for target in TASK_TARGETS:
                    owner = getattr(block, TARGET_PATHS[target][0])
                    layer = getattr(owner, TARGET_PATHS[target][1])
                    if isinstance(layer, TaskLoRALinear):
                        self.dropped_parameters += _task_parameters(layer)
                        setattr(owner, TARGET_PATHS[target][1], MatMulLinear(layer.base.weight, layer.base.bias))

    def _init_addition(self, model: MultiTaskSwin, config) -> None:
        """`addition` mode: every block with task adapters runs all task streams, stacked (see the module doc)."""
        self.stream_tasks = tuple(model.tasks)  # the shared stream needs every task, whichever are exported
        stacks = nn.ModuleList()
        self.task_blocks: list[list[bool]] = []
        for stage in model.backbone.layers:
            factors = nn.ModuleDict()
            blocks = list(stage.blocks)
            self.task_blocks.append([])
            for j, block in enumerate(blocks):
                has_tasks = isinstance(block.attn.proj, TaskLoRALinear)
                self.task_blocks[-1].append(has_tasks)
                if not has_tasks:
                    continue
                prefix = "" if j == len(blocks) - 1 else f"block{j}_"
                for target in TASK_TARGETS:
                    owner = getattr(block, TARGET_PATHS[target][0])
                    layer = getattr(owner, TARGET_PATHS[target][1])
                    per_task = [TaskFactors(*layer.folded_task_factors(t)) for t in self.stream_tasks]
                    factors[prefix + target] = StackedTaskFactors(per_task, target == "proj")
                    setattr(owner, TARGET_PATHS[target][1], AdditionTaskLinear(layer))
            stacks.append(factors)
        swap_linears(model.backbone)
        self.backbone = ExportBackbone(model.backbone)
        self.task_branches = nn.ModuleDict()
        self.task_stack = stacks
        self.heads = self._make_heads(model)
        self.eval()

    def _addition_block(self, s: int, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block j of stage s in `addition` mode: x (B, H, W, C) -> shared output and the task streams (T, B H W, C)."""
        block = self.backbone.stages[s].blocks[j]
        factors = self.task_stack[s]
        prefix = "" if j == len(self.backbone.stages[s].blocks) - 1 else f"block{j}_"
        mlp, dim = block.mlp, block.dim

        def terms(target: str, inputs: torch.Tensor) -> torch.Tensor:
            stacked = factors[prefix + target]
            return torch.matmul(torch.matmul(inputs, stacked.lora_down), stacked.lora_up)

        mixed = block.mix(block.norm1(x)).reshape(-1, dim)  # (M, C), the input of every task
        anchor = block.proj.linear(mixed)
        rank = factors[prefix + "proj"].lora_up.shape[-2]
        low = torch.matmul(mixed, factors[prefix + "proj"].lora_down).reshape(-1, len(self.stream_tasks), rank)
        attn_tasks = anchor + torch.matmul(low.transpose(0, 1), factors[prefix + "proj"].lora_up)  # (T, M, C)
        x_flat = x.reshape(-1, dim)
        x_attn = x_flat + block.proj.shared_output(anchor, attn_tasks)
        attn_streams = x_flat + attn_tasks
        anchor = mlp.fc1.linear(block.norm2(x_attn))
        fc1_tasks = anchor + terms("fc1", block.norm2(attn_streams))
        hidden = mlp.norm(mlp.act(mlp.fc1.shared_output(anchor, fc1_tasks)))
        hidden_tasks = mlp.norm(mlp.act(fc1_tasks))
        anchor = mlp.fc2.linear(hidden)
        fc2_tasks = anchor + terms("fc2", hidden_tasks)
        out = x_attn + mlp.fc2.shared_output(anchor, fc2_tasks)
        return out.reshape(-1, *block.resolution, dim), attn_streams + fc2_tasks

    def _addition_stage(self, s: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage s in `addition` mode: the shared output (before patch merging) and the last block's task streams."""
        stack = None
        for j, block in enumerate(self.backbone.stages[s].blocks):
            if self.task_blocks[s][j]:
                x, stack = self._addition_block(s, j, x)
            else:
                x = block(x)
        return x, stack

    def _addition_features(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Per-task NHWC features (after each stage's patch merging) of the exported tasks."""
        x = self.backbone.embed(image)
        features: dict[str, list[torch.Tensor]] = {t: [] for t in self.tasks}
        for s in range(self.num_stages):
            x, stack = self._addition_stage(s, x)
            if s < self.num_stages - 1:
                x = self.backbone.stages[s].merging(x)
            streams = dict(zip(self.stream_tasks, self.task_features(s, stack, len(self.stream_tasks)), strict=True))
            for t in self.tasks:
                features[t].append(streams[t])
        return features

    def backbone_output_names(self) -> list[str]:
        """Names of what the split layout's backbone computes once for every head, in output order."""
        if self.addition:
            return [f"stage{s}_{t}" for t in self.tasks for s in range(self.num_stages)]
        names = []
        for s in range(self.num_stages):
            if self.has_task_streams:
                attn_input = "attn_down" if self.shared_down else "attn_mix"
                names += [f"stage{s}_{k}" for k in ("attn_anchor", attn_input, "fc1_anchor", "fc2_anchor")]
            else:
                names.append(f"stage{s}_feature")
        return names

    def head_input_names(self, task: str) -> list[str]:
        """The backbone outputs `task`'s head graph reads: all of them, or in `addition` mode its own features."""
        if self.addition:
            return [f"stage{s}_{task}" for s in range(self.num_stages)]
        return self.backbone_output_names()

    # ------------------------------------------------------------------ pieces

    def shared_stage(self, s: int, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage `s` on the shared stream: x (B, H, W, C) -> the shared output (before patch
        merging) and, with task streams, what the task branches need from the last block:
        [x + proj anchor, proj input (or A x for MTL-LoRA), fc1 anchor, fc2 anchor]."""
        blocks = self.backbone.stages[s].blocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        if not self.has_task_streams:
            return last(x), []
        mlp = last.mlp
        mixed = last.mix(last.norm1(x))  # (B, H, W, C)
        proj_shared, proj_anchor = last.proj(mixed)
        x_attn = x + proj_shared
        hidden_shared, fc1_anchor = mlp.fc1(last.norm2(x_attn))
        out_shared, fc2_anchor = mlp.fc2(mlp.norm(mlp.act(hidden_shared)))
        shared_down = last.proj.lora_shared_down
        # MTL-LoRA: every task reads the same attention output, so A x is computed once, here.
        attn_input = mixed if shared_down is None else torch.matmul(mixed, shared_down)
        return x_attn + out_shared, [x + proj_anchor, attn_input, fc1_anchor, fc2_anchor]

    def _factors(self, s: int, target: str, tasks: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(down, up) of a task layer for the stacked streams of `tasks`: all of them, or one."""
        if len(tasks) == 1:
            factors = self.task_branches[tasks[0]][s][target]
        elif tuple(tasks) == self.tasks:
            factors = self.task_stack[s][target]
        else:
            raise ExportError(f"internal: task streams are stacked for one task or all, not {list(tasks)}")
        return factors.lora_down, factors.lora_up

    def _task_terms(self, layer: TaskAnchorLinear, s: int, target: str, x: torch.Tensor,
                    tasks: Sequence[str]) -> torch.Tensor:
        """The low-rank terms of a task layer on the stacked streams x (T, M, in) -> (T, M, out)."""
        down, up = self._factors(s, target, tasks)
        # MTL-LoRA: the task streams differ but A is shared: one MatMul over the stack.
        down = layer.lora_shared_down if down is None else down
        return torch.matmul(torch.matmul(x, down), up)

    def _proj_terms(self, s: int, attn_input: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """The attention projection's low-rank terms (T, M, C); every task reads the same input.

        attn_input: (B, H, W, C), or A x (B, H, W, r) with MTL-LoRA's shared down-projection.
        """
        down, up = self._factors(s, "proj", tasks)
        if down is None:
            low = attn_input.reshape(1, -1, attn_input.shape[-1])  # (1, M, r): broadcast over the tasks
        else:
            # All tasks' down factors side by side: one (C, T r) MatMul, then split into T rank-r inputs.
            rank = up.shape[-2]
            low = torch.matmul(attn_input, down).reshape(-1, len(tasks), rank).transpose(0, 1)  # (T, M, r)
        return torch.matmul(low, up)

    def task_stage(self, s: int, anchors: Sequence[torch.Tensor], tasks: Sequence[str]) -> torch.Tensor:
        """The task streams of stage `s` (before patch merging), stacked: (T, B H W, C), from the shared anchors."""
        attn_anchor, attn_input, fc1_anchor, fc2_anchor = anchors
        last = self.backbone.stages[s].blocks[-1]
        mlp = last.mlp
        dim, hidden_dim = last.dim, mlp.fc1.linear.weight_t.shape[1]
        # The shared anchors as (B H W, C): they broadcast over the task axis.
        attn = attn_anchor.reshape(-1, dim) + self._proj_terms(s, attn_input, tasks)
        fc1 = fc1_anchor.reshape(-1, hidden_dim) + self._task_terms(mlp.fc1, s, "fc1", last.norm2(attn), tasks)
        hidden = mlp.norm(mlp.act(fc1))
        return attn + (fc2_anchor.reshape(-1, dim) + self._task_terms(mlp.fc2, s, "fc2", hidden, tasks))

    def task_features(self, s: int, stack: torch.Tensor, num_tasks: int) -> list[torch.Tensor]:
        """The stacked task streams of stage `s` -> one NHWC feature per task, after the stage's patch merging.

        Patch merging reads the stack as T B images, so no stream is copied out first.
        """
        merging = self.backbone.stages[s].merging
        if merging is None:
            block = self.backbone.stages[s].blocks[-1]
            shape = (*block.resolution, block.dim)
        else:
            stack, shape = merging(stack), merging.out_shape
        # reshape and indexing, not unflatten / unbind: the tracer bakes the batch size into those.
        if num_tasks == 1:
            return [stack.reshape(-1, *shape)]
        stack = stack.reshape(num_tasks, -1, *shape)
        return [stack[i] for i in range(num_tasks)]

    # ------------------------------------------------------------------ the three graphs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        role, task = self.role
        if role == "backbone":
            return self.forward_backbone(*inputs)
        if role == "head":
            return (self.forward_head(task, *inputs),)
        return self.forward_model(*inputs)

    def forward_model(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """image (B, 3, H, W) -> one (B, C_task, H, W) output per task."""
        if self.addition:
            features = self._addition_features(image)
            return tuple(self.heads[t](features[t]) for t in self.tasks)
        x = self.backbone.embed(image)
        features: dict[str, list[torch.Tensor]] = {t: [] for t in self.tasks}
        for s in range(self.num_stages):
            x, anchors = self.shared_stage(s, x)
            last_stage = s == self.num_stages - 1
            if self.has_task_streams:
                stack = self.task_stage(s, anchors, self.tasks)
                # The shared stream goes on into the next stage; each task stream becomes a feature.
                if not last_stage:
                    x = self.backbone.stages[s].merging(x)
                for t, feature in zip(self.tasks, self.task_features(s, stack, len(self.tasks)), strict=True):
                    features[t].append(feature)
            else:
                if not last_stage:
                    x = self.backbone.stages[s].merging(x)
                for t in self.tasks:
                    features[t].append(x)
        return tuple(self._finish(t, self.heads[t](features[t])) for t in self.tasks)

    def forward_backbone(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """image -> the tensors named by `backbone_output_names`, all NHWC."""
        if self.addition:
            features = self._addition_features(image)
            return tuple(f for t in self.tasks for f in features[t])
        x = self.backbone.embed(image)
        outputs: list[torch.Tensor] = []
        for s in range(self.num_stages):
            x, anchors = self.shared_stage(s, x)
            if s < self.num_stages - 1:
                x = self.backbone.stages[s].merging(x)
            outputs += anchors if self.has_task_streams else [x]
        return tuple(outputs)

    def forward_head(self, task: str, *backbone_outputs: torch.Tensor) -> torch.Tensor:
        """The backbone outputs -> this task's map (B, C_task, H, W)."""
        if not self.has_task_streams or self.addition:
            return self._finish(task, self.heads[task](list(backbone_outputs)))
        features = []
        for s in range(self.num_stages):
            stack = self.task_stage(s, backbone_outputs[4 * s: 4 * s + 4], (task,))
            features += self.task_features(s, stack, 1)
        return self._finish(task, self.heads[task](features))

    def _finish(self, task: str, output: torch.Tensor) -> torch.Tensor:
        """A head's (B, C, H, W) output, post-processed when the export asks for it."""
        return POSTPROCESS[self.postprocess[task]](output)


# The in-graph post-processing ops, by the names `mtlora.tasks.POSTPROCESS` gives their numpy twins.
POSTPROCESS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda output: output,
    # (B, H, W) class ids, through float32: TensorRT converts uint8 only to or from float32/float16 (its
    # UINT8 data-type rule), and ArgMax's indices are INT64; ids below 256 are exact in float.
    "argmax": lambda output: output.argmax(dim=1).to(torch.float32).to(torch.uint8),
    "sigmoid": torch.sigmoid,
    "normalize": lambda output: F.normalize(output, dim=1, eps=NORMALIZE_EPS),
}
