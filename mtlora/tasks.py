"""The dense-prediction tasks we know, as data: one row per task, one row per kind of output map.

A kind's row carries its behaviour, so nothing asks `if kind == ...`:
- here, torch-free: its agreement rule with a reference (`AGREEMENTS`), its in-graph
  post-processing (`POSTPROCESS`, the same ops `export.onnx.fold` has in torch), how it is drawn
  (`render`, `render_label`, `difference`), what a meter takes of it (`for_meter`) and its default
  accuracy limits at each precision's levels (`default_limits`);
- registered beside it by the module that owns the work, in the style of timm's registries:
  its meters (`register_meter`, in `mtlora.metrics`) and how data transforms move its labels
  (`mtlora.data.transforms.register_label_layout`). A task names its loss, registered with
  `mtlora.losses.register_loss` (the one torch part), and the synthetic data set draws a task's
  label with `mtlora.data.synthetic.register_synthetic_label`.
Adding a kind is `register_kind(TaskKind(...))` plus those registrations; adding a task is
`register_task(Task(...))`. numpy only: engines on a device without torch read it too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from mtlora import palette
from mtlora.errors import ConfigError

# Kinds of output map.
CLASS_MAP = "class_map"  # (C, H, W) logits, one channel per class; label (H, W) int, 255 = ignore
BINARY_MAP = "binary_map"  # (1, H, W) logits of one binary map; label (1, H, W) in [0, 1]
NORMALS = "normals"  # (3, H, W) surface normal vectors, compared as unit vectors
DEPTH = "depth"  # (1, H, W) metric depth
# What an export with in-graph post-processing outputs instead (what a device application wants).
CLASS_IDS = "class_ids"  # (H, W) uint8: the arg-max class of a class map
PROBABILITY = "probability"  # (1, H, W) float: the sigmoid of a binary map's logits

# The epsilon of unit normalisation, in the graph (torch.nn.functional.normalize) and here alike.
NORMALIZE_EPS = 1e-12

Levels = Mapping[str, "float | None"]  # a precision's levels: max_abs, cosine, agreement, angle, drop, ids


def unit_vectors(v: np.ndarray, axis: int = 1) -> np.ndarray:
    """Vectors along `axis` scaled to unit length in float64; zero vectors stay zero."""
    v = np.asarray(v, dtype=np.float64)
    norm = np.linalg.norm(v, axis=axis, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def angle_degrees(a: np.ndarray, b: np.ndarray, axis: int = 1) -> np.ndarray:
    """Degrees between the vectors of `a` and `b` along `axis`, each normalised first (a zero vector is
    90 degrees from any unit one). `2 * atan2(|a - b|, |a + b|)` is accurate near 0 and 180 degrees,
    where `acos` of the dot product is not."""
    a, b = unit_vectors(a, axis), unit_vectors(b, axis)
    return np.degrees(2 * np.arctan2(np.linalg.norm(a - b, axis=axis), np.linalg.norm(a + b, axis=axis)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # overflow-free logistic


@dataclass(frozen=True)
class Agreement:
    """How an engine's map is compared with the reference's beyond tensor error.

    measure(engine, reference) -> (sum, count) over a batch; the measurement is sum / count, reported
    as `measurement` and judged by the tolerance limit `limit`, whose default is `level(levels)`.
    """

    name: str
    measure: Callable[[np.ndarray, np.ndarray], tuple[float, int]]
    measurement: str
    limit: str
    level: Callable[[Levels], float | None]


def _same(engine: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    return float((engine == reference).sum()), engine.size


def _summed(values: np.ndarray) -> tuple[float, int]:
    return float(values.sum()), values.size


def _agreement_level(levels: Levels) -> float | None:
    return levels["agreement"]


AGREEMENTS: dict[str, Agreement] = {a.name: a for a in (
    # same class per pixel
    Agreement("argmax", lambda e, r: _same(e.argmax(1), r.argmax(1)), "argmax_agreement", "min_argmax_agreement",
              _agreement_level),
    # same side of the logit threshold 0
    Agreement("sign", lambda e, r: _same(e > 0, r > 0), "argmax_agreement", "min_argmax_agreement", _agreement_level),
    # same class id; post-processed ids have no tensor to compare, so their floor is also the `ids` level
    Agreement("equal", _same, "argmax_agreement", "min_argmax_agreement",
              lambda levels: max(levels["agreement"] or 0.0, levels["ids"])),
    # same side of probability 0.5
    Agreement("half", lambda e, r: _same(e > 0.5, r > 0.5), "argmax_agreement", "min_argmax_agreement",
              _agreement_level),
    # mean degrees between unit normals
    Agreement("angle", lambda e, r: _summed(angle_degrees(e, r)), "angle_deg", "max_angle_deg",
              lambda levels: levels["angle"]),
)}

# In-graph post-processing ops, in numpy: the reference side of checking a post-processed engine.
POSTPROCESS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "argmax": lambda x: x.argmax(axis=1).astype(np.uint8),
    "sigmoid": lambda x: _sigmoid(x).astype(np.float32),
    "normalize": lambda x: (x / np.maximum(np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True),
                                           NORMALIZE_EPS)).astype(np.float32),
}

TENSOR_LIMITS = ("max_abs", "mean_abs", "min_cosine")


def _logit(probability: np.ndarray) -> np.ndarray:
    p = np.clip(probability.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class TaskKind:
    """What a kind of output map is, how it is judged and drawn.

    agreement: a key of `AGREEMENTS`, or None.
    activation: what a device application applies to the raw output ("softmax", "sigmoid",
      "normalize" to unit length, or "none").
    postprocess: a key of `POSTPROCESS` (what in-graph post-processing does to it), and
      `postprocessed` the kind of the result.
    tensor_checks: whether max abs / cosine limits mean anything for it (not for class ids).
    has_channels: whether one image's output is (C, H, W); class ids are (H, W).
    metric_drop: a fixed allowance for the metric drop in the metric's units (normals: degrees),
      instead of the precision's level.
    render(output) / render_label(label) -> RGB; difference(engine, reference) -> (RGB, legend).
    for_meter(output) -> what its meter takes (the model's logits).
    meters: metric name -> factory(task, num_classes) of a `mtlora.metrics.Evaluator` (`register_meter`).
    """

    name: str
    agreement: str | None
    activation: str
    postprocess: str = "none"
    postprocessed: str = ""
    tensor_checks: bool = True
    has_channels: bool = True
    metric_drop: float | None = None
    render: Callable[[np.ndarray], np.ndarray] = lambda output: palette.heat(output[0])
    render_label: Callable[[np.ndarray], np.ndarray] = lambda label: palette.heat(palette.plane(label))
    difference: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, str]] = palette.absolute_difference
    for_meter: Callable[[np.ndarray], np.ndarray] = lambda output: output
    meters: dict[str, Callable] = field(default_factory=dict, compare=False, repr=False)

    @property
    def after_postprocess(self) -> str:
        return self.postprocessed or self.name

    @property
    def limit_names(self) -> tuple[str, ...]:
        """The tolerance limits this kind has a measurement for (`export.checking.accuracy`)."""
        agreement = (AGREEMENTS[self.agreement].limit,) if self.agreement else ()
        return (TENSOR_LIMITS if self.tensor_checks else ()) + ("max_metric_drop",) + agreement

    def default_limits(self, levels: Levels) -> dict[str, float | None]:
        """Its limits at a precision's levels (`export.checking.tolerances.LEVELS`); None: not checked."""
        limits = {"max_abs": levels["max_abs"], "min_cosine": levels["cosine"]} if self.tensor_checks else {}
        if self.agreement:
            rule = AGREEMENTS[self.agreement]
            limits[rule.limit] = rule.level(levels)
        drop = levels["drop"]
        limits["max_metric_drop"] = self.metric_drop if drop is not None and self.metric_drop is not None else drop
        return limits


def _class_map_difference(engine: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str]:
    return palette.disagreement(engine.argmax(0) != reference.argmax(0))


def _normals_difference(engine: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str]:
    angle = angle_degrees(engine, reference, axis=0)
    return palette.heat(angle, vmax=10.0), f"angular error, 0-10 deg (mean {angle.mean():.3f} deg)"


def _normals_label(label: np.ndarray) -> np.ndarray:
    """Labels are (H, W, 3) or (3, H, W); unlabelled (zero) pixels are drawn white."""
    label = np.asarray(label)
    hwc = label if label.shape[-1] == 3 else np.moveaxis(label, 0, -1)
    rgb = palette.normals_colours(hwc)
    rgb[np.linalg.norm(hwc, axis=-1) == 0] = 255
    return rgb


KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    """Add a kind of output map (its row); returns it."""
    if kind.agreement is not None and kind.agreement not in AGREEMENTS:
        raise ConfigError(f"kind {kind.name!r}: unknown agreement {kind.agreement!r}; known: {', '.join(AGREEMENTS)}")
    if kind.postprocess not in POSTPROCESS:
        raise ConfigError(f"kind {kind.name!r}: unknown post-processing {kind.postprocess!r}; "
                          f"known: {', '.join(POSTPROCESS)}")
    KINDS[kind.name] = kind
    return kind


for _kind in (
    TaskKind(CLASS_MAP, agreement="argmax", activation="softmax", postprocess="argmax", postprocessed=CLASS_IDS,
             render=lambda output: palette.class_colours(output.argmax(0)), render_label=palette.class_label_colours,
             difference=_class_map_difference),
    TaskKind(BINARY_MAP, agreement="sign", activation="sigmoid", postprocess="sigmoid", postprocessed=PROBABILITY,
             render=lambda output: palette.grey(_sigmoid(output[0])),
             render_label=lambda label: palette.grey(palette.plane(label))),
    TaskKind(NORMALS, agreement="angle", activation="normalize", postprocess="normalize", metric_drop=0.5,
             render=lambda output: palette.normals_colours(np.moveaxis(unit_vectors(output, 0), 0, -1)),
             render_label=_normals_label, difference=_normals_difference),
    TaskKind(DEPTH, agreement=None, activation="none"),
    TaskKind(CLASS_IDS, agreement="equal", activation="none", tensor_checks=False, has_channels=False,
             render=palette.class_colours, render_label=palette.class_label_colours,
             difference=lambda engine, reference: palette.disagreement(engine != reference)),
    TaskKind(PROBABILITY, agreement="half", activation="none", render=lambda output: palette.grey(output[0]),
             render_label=lambda label: palette.grey(palette.plane(label)), for_meter=_logit),
):
    register_kind(_kind)


def register_meter(kind: str, metric: str):
    """Decorator: `factory(task, num_classes) -> Evaluator` is the meter of `metric` for tasks of `kind`."""
    def add(factory):
        KINDS[kind].meters[metric] = factory
        return factory
    return add


@dataclass(frozen=True)
class Task:
    """One task of the PASCAL-Context / NYUD-v2 multi-task benchmarks.

    channels: the benchmark's output channels (a data set may override classes: NYUD semseg has 40).
    metric / higher_is_better: the primary metric the multi-task delta and the accuracy gate use.
    loss / loss_weight: the official training loss (a name `mtlora.losses.register_loss` knows) and its
      weight in the official configs.
    empty_is_unlabelled: a label map with nothing but background after resizing means "not annotated"
      (upstream's AddIgnoreRegions: PASCAL images without people have no human-parts annotation).
    """

    name: str
    kind: str
    channels: int
    metric: str
    higher_is_better: bool
    loss: str
    loss_weight: float
    empty_is_unlabelled: bool = False

    @property
    def spec(self) -> TaskKind:
        return KINDS[self.kind]


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task (its row); its kind must be registered first."""
    if task.kind not in KINDS:
        raise ConfigError(f"task {task.name!r}: unknown kind {task.kind!r}; known: {', '.join(KINDS)}")
    TASKS[task.name] = task
    return task


for _task in (
    Task("semseg", CLASS_MAP, 21, "mIoU", True, "cross_entropy", 1.0),
    Task("human_parts", CLASS_MAP, 7, "mIoU", True, "cross_entropy", 2.0, empty_is_unlabelled=True),
    Task("sal", BINARY_MAP, 1, "mIoU", True, "balanced_bce", 5.0),
    Task("normals", NORMALS, 3, "mean", False, "unit_l1", 10.0),
    Task("edge", BINARY_MAP, 1, "odsF", True, "weighted_bce", 50.0),
    Task("depth", DEPTH, 1, "rmse", False, "l1", 1.0),
):
    register_task(_task)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def kind_of(name: str, postprocessed: bool = False) -> str:
    """The kind of a task's output: as trained, or after in-graph post-processing."""
    kind = get_task(name).kind
    return KINDS[kind].after_postprocess if postprocessed else kind


def postprocess(task: str, output):
    """A task's raw output batch (N, C, H, W) as in-graph post-processing makes it, in numpy:
    class maps -> (N, H, W) uint8 arg-max ids, binary maps -> sigmoid probabilities, normals ->
    unit vectors; anything else unchanged. The reference side of checking a post-processed engine."""
    return POSTPROCESS[get_task(task).spec.postprocess](np.asarray(output))
