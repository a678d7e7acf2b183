"""Per-task training losses of MTLoRA and their weighted sum.

Definitions follow the official code (scale-lab/MTLoRA `mtl_loss_schemes.py`):
cross-entropy for segmentation, HED-style balanced BCE for saliency, BCE with
a fixed positive weight for edges, L1 on unit-normalised normals and L1 on
depth, each over valid pixels only. Label layouts are those of
`mtlora.data.transforms`: segmentation `(N, H, W)` int64 with 255 = ignore;
sal / edge / depth `(N, 1, H, W)` float32; normals `(N, 3, H, W)` float32
whose ignored pixels are the zero vector; depth 0 = no measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import ConfigError
from mtlora.tasks import TASKS

IGNORE_INDEX = 255

# The loss weights of the official PASCAL-Context / NYUD configs (a task registered later brings its own:
# `MultiTaskLoss` reads `TASKS`).
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {t.name: t.loss_weight for t in TASKS.values()}

# The loss functions a task may name (`mtlora.tasks.Task.loss`): name -> loss(pred, label).
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register_loss(name: str):
    """Decorator: `loss(pred, label) -> scalar tensor` is the loss a task names `name`."""
    def add(loss):
        LOSSES[name] = loss
        return loss
    return add

# Upstream's `edge_w`: edges are rare, so positives get 95% of the weight.
EDGE_POSITIVE_WEIGHT = 0.95


def _check_spatial(pred: torch.Tensor, label: torch.Tensor, task: str) -> None:
    if pred.shape[-2:] != label.shape[-2:] or pred.shape[0] != label.shape[0]:
        raise ConfigError(
            f"{task}: prediction shape {tuple(pred.shape)} does not fit label shape {tuple(label.shape)}; "
            "the head must output at label resolution"
        )


def _zero_like(pred: torch.Tensor) -> torch.Tensor:
    # Keeps the graph connected (DDP and `backward` want every output used) while adding nothing.
    return pred.sum() * 0.0


@register_loss("cross_entropy")
def segmentation_loss(
    logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy averaged over labelled pixels; 0 when a batch has none (e.g. no people)."""
    if label.dim() == 4:
        label = label[:, 0]
    _check_spatial(logits, label, "segmentation")
    label = label.long()
    if not bool((label != ignore_index).any()):
        return _zero_like(logits)
    return F.cross_entropy(logits, label, ignore_index=ignore_index)


@register_loss("balanced_bce")
def balanced_bce_loss(
    logits: torch.Tensor, label: torch.Tensor, positive_weight: float | None = None
) -> torch.Tensor:
    """Class-balanced binary cross-entropy, normalised by the number of label elements.

    With `positive_weight=None` the weight is the batch's fraction of negative
    pixels (HED style, used for saliency); otherwise it is fixed (0.95 for
    edges). Positives are label >= 0.5; pixels labelled 255 are void.
    """
    if logits.shape != label.shape:
        raise ConfigError(
            f"prediction shape {tuple(logits.shape)} does not match label shape {tuple(label.shape)}"
        )
    label = label.float()
    valid = (label != IGNORE_INDEX).float()
    positive = (label >= 0.5).float() * valid
    negative = (1.0 - positive) * valid
    per_pixel = F.binary_cross_entropy_with_logits(logits, positive, reduction="none")
    loss_positive = (per_pixel * positive).sum()
    loss_negative = (per_pixel * negative).sum()
    if positive_weight is None:
        weight = negative.sum() / valid.sum().clamp(min=1.0)
    else:
        weight = torch.as_tensor(positive_weight, dtype=logits.dtype, device=logits.device)
    return (weight * loss_positive + (1.0 - weight) * loss_negative) / label.numel()


@register_loss("unit_l1")
def normals_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """L1 between unit-normalised predictions and labels, averaged over valid label components.

    A label pixel is valid when its vector is non-zero (and not the upstream 255 fill).
    """
    if pred.shape != label.shape or pred.shape[1] != 3:
        raise ConfigError(
            f"normals: prediction {tuple(pred.shape)} and label {tuple(label.shape)} must be (N, 3, H, W)"
        )
    valid = (label.abs().sum(dim=1, keepdim=True) > 0) & ~(label == IGNORE_INDEX).any(dim=1, keepdim=True)
    valid = valid.expand_as(label)
    count = int(valid.sum())
    if count == 0:
        return _zero_like(pred)
    unit = pred / (torch.linalg.vector_norm(pred, dim=1, keepdim=True) + 1e-12)
    return (unit[valid] - label[valid]).abs().sum() / count


@register_loss("l1")
def depth_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """L1 over pixels with a measured depth (label > 0)."""
    if pred.shape != label.shape:
        raise ConfigError(
            f"depth: prediction shape {tuple(pred.shape)} does not match label shape {tuple(label.shape)}"
        )
    valid = torch.isfinite(label) & (label > 0)
    if not bool(valid.any()):
        return _zero_like(pred)
    return F.l1_loss(pred[valid], label[valid])


@register_loss("weighted_bce")
def edge_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Balanced BCE with upstream's fixed positive weight for edges."""
    return balanced_bce_loss(pred, label, positive_weight=EDGE_POSITIVE_WEIGHT)


def task_loss(task: str, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The loss of one task (see the module docstring for label layouts)."""
    if task not in TASKS:
        raise ConfigError(f"no loss for task {task!r}; known tasks: {', '.join(TASKS)}")
    name = TASKS[task].loss
    if name not in LOSSES:
        raise ConfigError(f"task {task!r} names the loss {name!r}, which is not registered; known: {', '.join(LOSSES)}")
    return LOSSES[name](pred, label)


class MultiTaskLoss(nn.Module):
    """Weighted sum of the per-task losses.

    `forward(preds, targets)` takes dicts keyed by task and returns
    `(total, per_task)`, where `per_task` holds each unweighted task loss.
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None):
        super().__init__()
        if not tasks:
            raise ConfigError("MultiTaskLoss needs at least one task")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ConfigError(
                f"no loss for task(s) {unknown}; known tasks: {', '.join(TASKS)}"
            )
        weights = dict(weights or {})
        extra = sorted(set(weights) - set(tasks))
        if extra:
            raise ConfigError(
                f"loss weights given for task(s) {extra} that are not trained; tasks: {list(tasks)}"
            )
        self.tasks = tuple(tasks)
        self.weights = {t: float(weights.get(t, TASKS[t].loss_weight)) for t in self.tasks}

    def forward(
        self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        missing = [t for t in self.tasks if t not in preds or t not in targets]
        if missing:
            raise ConfigError(f"predictions or targets lack task(s) {missing}")
        per_task = {t: task_loss(t, preds[t], targets[t]) for t in self.tasks}
        total = sum(self.weights[t] * per_task[t] for t in self.tasks)
        return total, per_task
