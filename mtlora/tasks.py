"""The dense-prediction tasks we know, as data: one row per task, one per kind of output.

Everything that varies by task reads this table: the default output channels,
the loss and its weight, the metric and which way is better, how an engine's
output is compared with the PyTorch one, how a map is drawn, which output
activation a device application applies, and which tolerance keys apply.
Adding a task means adding a row here (and a meter/loss if its kind is new).
Pure Python: engines on a device without torch read it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtlora.errors import ConfigError

# Kinds of output map.
CLASS_MAP = "class_map"  # (C, H, W) logits, one channel per class; label (H, W) int, 255 = ignore
BINARY_MAP = "binary_map"  # (1, H, W) logits of one binary map; label (1, H, W) in [0, 1]
NORMALS = "normals"  # (3, H, W) surface normal vectors, compared as unit vectors
DEPTH = "depth"  # (1, H, W) metric depth
# What an export with in-graph post-processing outputs instead (what a device application wants).
CLASS_IDS = "class_ids"  # (H, W) uint8: the arg-max class of a class map
PROBABILITY = "probability"  # (1, H, W) float: the sigmoid of a binary map's logits


@dataclass(frozen=True)
class TaskKind:
    """What a kind of output map is and how it is judged.

    agreement: how an engine's map is compared with the reference's beyond tensor error:
      "argmax" (same class per pixel), "sign" (same side of the logit threshold 0),
      "equal" (same class id), "half" (same side of probability 0.5),
      "angle" (degrees between unit normals) or None.
    activation: what a device application applies to the raw output ("softmax",
      "sigmoid", "normalize" to unit length, or "none").
    palette: how a map is drawn ("voc" class colours, "grey" probability, "normals" xyz->rgb, "heat").
    postprocess: what in-graph post-processing does to it ("argmax", "sigmoid", "normalize" or
      "none"), and `postprocessed` the kind of the result.
    tensor_checks: whether max abs / cosine limits mean anything for it (not for class ids).
    """

    name: str
    agreement: str | None
    activation: str
    palette: str
    postprocess: str = "none"
    postprocessed: str = ""
    tensor_checks: bool = True

    @property
    def after_postprocess(self) -> str:
        return self.postprocessed or self.name


KINDS: dict[str, TaskKind] = {
    CLASS_MAP: TaskKind(CLASS_MAP, agreement="argmax", activation="softmax", palette="voc", postprocess="argmax",
                        postprocessed=CLASS_IDS),
    BINARY_MAP: TaskKind(BINARY_MAP, agreement="sign", activation="sigmoid", palette="grey", postprocess="sigmoid",
                         postprocessed=PROBABILITY),
    NORMALS: TaskKind(NORMALS, agreement="angle", activation="normalize", palette="normals", postprocess="normalize"),
    DEPTH: TaskKind(DEPTH, agreement=None, activation="none", palette="heat"),
    CLASS_IDS: TaskKind(CLASS_IDS, agreement="equal", activation="none", palette="voc_ids", tensor_checks=False),
    PROBABILITY: TaskKind(PROBABILITY, agreement="half", activation="none", palette="grey_probability"),
}


@dataclass(frozen=True)
class Task:
    """One task of the PASCAL-Context / NYUD-v2 multi-task benchmarks.

    channels: the benchmark's output channels (a data set may override classes: NYUD semseg has 40).
    metric / higher_is_better: the primary metric the multi-task delta and the accuracy gate use.
    loss / loss_weight: the official training loss and its weight in the official configs.
    """

    name: str
    kind: str
    channels: int
    metric: str
    higher_is_better: bool
    loss: str
    loss_weight: float

    @property
    def spec(self) -> TaskKind:
        return KINDS[self.kind]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("semseg", CLASS_MAP, 21, "mIoU", True, "cross_entropy", 1.0),
        Task("human_parts", CLASS_MAP, 7, "mIoU", True, "cross_entropy", 2.0),
        Task("sal", BINARY_MAP, 1, "mIoU", True, "balanced_bce", 5.0),
        Task("normals", NORMALS, 3, "mean", False, "unit_l1", 10.0),
        Task("edge", BINARY_MAP, 1, "odsF", True, "weighted_bce", 50.0),
        Task("depth", DEPTH, 1, "rmse", False, "l1", 1.0),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def kind_of(name: str, postprocessed: bool = False) -> str:
    """The kind of a task's output: as trained, or after in-graph post-processing."""
    kind = get_task(name).kind
    return KINDS[kind].after_postprocess if postprocessed else kind


def tasks_of_kind(kind: str) -> tuple[str, ...]:
    return tuple(t.name for t in TASKS.values() if t.kind == kind)


# The epsilon of unit normalisation, in the graph (torch.nn.functional.normalize) and here alike.
NORMALIZE_EPS = 1e-12


def postprocess(task: str, output):
    """A task's raw output batch (N, C, H, W) as in-graph post-processing makes it, in numpy:
    class maps -> (N, H, W) uint8 arg-max ids, binary maps -> sigmoid probabilities, normals ->
    unit vectors; anything else unchanged. The reference side of checking a post-processed engine."""
    import numpy as np

    op = KINDS[get_task(task).kind].postprocess
    x = np.asarray(output)
    if op == "argmax":
        return x.argmax(axis=1).astype(np.uint8)
    if op == "sigmoid":
        return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(np.float32)
    if op == "normalize":
        norm = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        return (x / np.maximum(norm, NORMALIZE_EPS)).astype(np.float32)
    return x
