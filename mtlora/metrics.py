"""Multi-task evaluation metrics, numpy only (engines run them on devices without torch).

Each metric is a streaming accumulator: `update(pred, label)` per batch keeps
only fixed-size counters (confusion matrices, per-threshold counts,
histograms), so evaluating a whole validation set uses flat memory, and
`result()` returns a dict of floats. Definitions follow the official MTLoRA
evaluation (scale-lab/MTLoRA `evaluation/`); where that code has a known slip
the docstring says what we do instead. Scores that upstream reports as
fractions (IoU, F-measures, accuracies) are reported here in percent, the unit
of the published tables and of `PASCAL_SINGLE_TASK_BASELINES`.

Arrays may be anything `np.asarray` accepts (CPU torch tensors included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from mtlora.errors import ConfigError, DataError
from mtlora.tasks import BINARY_MAP, CLASS_MAP, DEPTH, NORMALS, TASKS, angle_degrees, get_task, register_meter

IGNORE_INDEX = 255



class _TaskMetrics(Mapping):
    """task -> (primary metric, higher is better), read from `mtlora.tasks.TASKS` when asked, so a task
    registered later is in it too. The primary metric is what the multi-task delta compares."""

    def __getitem__(self, task: str) -> tuple[str, bool]:
        spec = TASKS[task]
        return spec.metric, spec.higher_is_better

    def __iter__(self):
        return iter(TASKS)

    def __len__(self) -> int:
        return len(TASKS)


TASK_METRICS: Mapping[str, tuple[str, bool]] = _TaskMetrics()

# Single-task Swin-T references on PASCAL-Context from the MTLoRA paper:
# semseg / human_parts / sal mIoU in percent, normals mean angular error in degrees.
PASCAL_SINGLE_TASK_BASELINES: dict[str, float] = {
    "semseg": 67.21,
    "human_parts": 61.93,
    "sal": 62.35,
    "normals": 17.97,
}


class Evaluator:
    """Interface of every meter: `update` per batch, `result` at the end, `reset` to reuse."""

    def update(self, pred, label) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


def _as_maps(array, name: str, channels: int | None = None) -> np.ndarray:
    """Bring `(H, W)`, `(N, H, W)` or `(N, 1, H, W)` to `(N, H, W)`; with `channels`, `(N, C, H, W)`."""
    array = np.asarray(array)
    if channels is None:
        if array.ndim == 4 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ConfigError(f"{name} must be (H, W), (N, H, W) or (N, 1, H, W), got shape {array.shape}")
        return array
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != channels:
        raise ConfigError(
            f"{name} must be ({channels}, H, W) or (N, {channels}, H, W), got shape {array.shape}"
        )
    return array


def _check_same_shape(pred: np.ndarray, label: np.ndarray) -> None:
    if pred.shape != label.shape:
        raise ConfigError(
            f"prediction shape {pred.shape} does not match label shape {label.shape}; "
            "resize predictions to the label resolution first"
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


class SegmentationMeter(Evaluator):
    """Mean IoU from a confusion matrix accumulated over the whole set.

    `pred` is either logits / scores `(N, C, H, W)` (arg-maxed over C) or an
    integer label map of the label's shape. Pixels labelled `ignore_index`
    are skipped. As in the official evaluation, a class that never occurs in
    labels nor predictions scores IoU 0 and still counts in the mean; on a
    real validation set every class occurs.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)  # [label, pred]

    def update(self, pred, label) -> None:
        label = _as_maps(label, "label")
        pred = np.asarray(pred)
        if np.issubdtype(pred.dtype, np.floating):
            if pred.ndim == 3 and label.shape[0] == 1:
                pred = pred[None]
            pred = _as_maps(pred, "logits", channels=self.num_classes).argmax(axis=1)
        else:
            pred = _as_maps(pred, "pred")
        _check_same_shape(pred, label)
        valid = label != self.ignore_index
        gt = label[valid].astype(np.int64)
        hit = pred[valid].astype(np.int64)
        if gt.size and (gt.min() < 0 or gt.max() >= self.num_classes):
            bad = gt[(gt < 0) | (gt >= self.num_classes)][0]
            raise DataError(
                f"label value {bad} is outside 0..{self.num_classes - 1} and is not the ignore value "
                f"{self.ignore_index}; check the label files or num_classes"
            )
        if hit.size and (hit.min() < 0 or hit.max() >= self.num_classes):
            raise ConfigError(f"predicted class ids must lie in 0..{self.num_classes - 1}")
        counts = np.bincount(gt * self.num_classes + hit, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes)

    def result(self) -> dict:
        tp = np.diag(self.confusion).astype(np.float64)
        fp = self.confusion.sum(axis=0) - tp
        fn = self.confusion.sum(axis=1) - tp
        total = self.confusion.sum()
        if total == 0:
            return {"mIoU": math.nan, "IoU": [math.nan] * self.num_classes, "pixel_accuracy": math.nan}
        iou = tp / np.maximum(tp + fp + fn, 1e-8)
        return {
            "mIoU": 100.0 * float(iou.mean()),
            "IoU": [100.0 * float(v) for v in iou],
            "pixel_accuracy": 100.0 * float(tp.sum() / total),
        }


class SaliencyMeter(Evaluator):
    """Saliency mIoU, maxF and beta-maxF, as the official `SaliencyMeter` reports them.

    - `mIoU`: per image and per threshold in `thresholds` (0.2..0.9, 15 steps),
      IoU of `prob > t` with the mask (1 when both are empty); averaged over
      images, then the best threshold.
    - `maxF`: per-image precision and recall averaged over images per
      threshold, F = 2PR / (P + R), best threshold.
    - `beta_maxF`: true/predicted/actual positives pooled over the set at
      thresholds 0.05..0.95 (`prob >= t`), F_beta with beta^2 = 0.3, best
      threshold. Upstream applies a sigmoid to values that already are
      probabilities there; we do not repeat that slip.

    `pred`: logits (`from_logits=True`) or probabilities, `(N, 1, H, W)`,
    `(N, H, W)` or `(H, W)`; `label`: {0, 1} (>= 0.5 counts as salient) with
    `ignore_index` pixels skipped.
    """

    def __init__(
        self,
        thresholds: Iterable[float] | None = None,
        beta_squared: float = 0.3,
        from_logits: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.thresholds = (
            np.linspace(0.2, 0.9, 15)
            if thresholds is None
            else np.asarray(list(thresholds), dtype=np.float64)
        )
        self.beta_thresholds = np.arange(1, 20) * 0.05
        self.beta_squared = beta_squared
        self.from_logits = from_logits
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        n = len(self.thresholds)
        self.sum_iou = np.zeros(n)
        self.sum_precision = np.zeros(n)
        self.sum_recall = np.zeros(n)
        self.num_images = 0
        m = len(self.beta_thresholds)
        self.true_positives = np.zeros(m, dtype=np.int64)
        self.predicted_positives = np.zeros(m, dtype=np.int64)
        self.actual_positives = 0

    def update(self, pred, label) -> None:
        label = _as_maps(label, "label")
        pred = _as_maps(pred, "pred").astype(np.float64)
        _check_same_shape(pred, label)
        prob = _sigmoid(pred) if self.from_logits else pred
        for image_prob, image_label in zip(prob, label, strict=True):
            valid = image_label != self.ignore_index
            gt = (image_label >= 0.5) & valid
            p = image_prob[valid]
            g = gt[valid]
            mask = p[None, :] > self.thresholds[:, None]  # (T, valid pixels)
            tp = (mask & g).sum(axis=1).astype(np.float64)
            fp = (mask & ~g).sum(axis=1)
            fn = (~mask & g).sum(axis=1)
            union = tp + fp + fn
            self.sum_iou += np.where(union == 0, 1.0, tp / np.maximum(union, 1))
            self.sum_precision += tp / (tp + fp + 1e-12)
            self.sum_recall += tp / (tp + fn + 1e-12)
            self.num_images += 1
            beta_mask = p[None, :] >= self.beta_thresholds[:, None]
            self.true_positives += (beta_mask & g).sum(axis=1)
            self.predicted_positives += beta_mask.sum(axis=1)
            self.actual_positives += int(g.sum())

    def result(self) -> dict:
        if self.num_images == 0:
            return {"mIoU": math.nan, "maxF": math.nan, "beta_maxF": math.nan}
        mean_iou = self.sum_iou / self.num_images
        precision = self.sum_precision / self.num_images
        recall = self.sum_recall / self.num_images
        f1 = 2 * precision * recall / (precision + recall + 1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            bp = self.true_positives / self.predicted_positives
            br = self.true_positives / self.actual_positives
            fbeta = (1 + self.beta_squared) * bp * br / (self.beta_squared * bp + br)
        fbeta = np.nan_to_num(fbeta, nan=0.0)
        best = int(np.argmax(mean_iou))
        return {
            "mIoU": 100.0 * float(mean_iou[best]),
            "mIoU_threshold": float(self.thresholds[best]),
            "maxF": 100.0 * float(f1.max()),
            "beta_maxF": 100.0 * float(fbeta.max()),
        }


class NormalsMeter(Evaluator):
    """Angular error of surface normals in degrees, over valid pixels.

    Predictions `(N, 3, H, W)` are normalised to unit length first (a zero
    vector counts as 90 degrees off). A label pixel is valid when its vector
    is non-zero and none of its components is 255 (the upstream ignore value);
    our loaders mark ignored pixels with the zero vector. The angle is
    `mtlora.tasks.angle_degrees`, accurate near 0 and 180 degrees.

    Reports `mean` (the paper's mErr), `rmse` (a true root-mean-square: the
    upstream `rmse` field repeats the mean), `median` (from a 0.01-degree
    histogram, so within 0.01 degrees), and the percentages of pixels under
    11.25, 22.5 and 30 degrees.
    """

    BIN_DEGREES = 0.01

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sum_error = 0.0
        self.sum_squared_error = 0.0
        self.count = 0
        self.within = {"11.25": 0, "22.5": 0, "30": 0}
        self.histogram = np.zeros(int(round(180.0 / self.BIN_DEGREES)) + 1, dtype=np.int64)

    def update(self, pred, label) -> None:
        pred = _as_maps(pred, "pred", channels=3).astype(np.float64)
        label = _as_maps(label, "label", channels=3).astype(np.float64)
        _check_same_shape(pred, label)
        valid = (np.linalg.norm(label, axis=1) > 0) & ~np.any(label == IGNORE_INDEX, axis=1)
        error = angle_degrees(pred, label, axis=1)[valid]
        self.sum_error += float(error.sum())
        self.sum_squared_error += float((error**2).sum())
        self.count += int(error.size)
        for key in self.within:
            self.within[key] += int((error < float(key)).sum())
        bins = np.minimum((error / self.BIN_DEGREES).astype(np.int64), len(self.histogram) - 1)
        self.histogram += np.bincount(bins, minlength=len(self.histogram))

    def result(self) -> dict:
        if self.count == 0:
            return {"mean": math.nan, "rmse": math.nan, "median": math.nan} | {
                k: math.nan for k in self.within
            }
        cumulative = np.cumsum(self.histogram)
        median_bin = int(np.searchsorted(cumulative, self.count / 2.0))
        return {
            "mean": self.sum_error / self.count,
            "rmse": math.sqrt(self.sum_squared_error / self.count),
            "median": (median_bin + 0.5) * self.BIN_DEGREES,
        } | {key: 100.0 * value / self.count for key, value in self.within.items()}


class DepthMeter(Evaluator):
    """Depth RMSE and log-RMSE in metres over pixels with a valid (> 0, finite) label.

    Predictions are clamped to 1e-9 before the log, as upstream does.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sum_squared_error = 0.0
        self.sum_squared_log_error = 0.0
        self.count = 0

    def update(self, pred, label) -> None:
        pred = _as_maps(pred, "pred").astype(np.float64)
        label = _as_maps(label, "label").astype(np.float64)
        _check_same_shape(pred, label)
        valid = np.isfinite(label) & (label > 0)
        p = np.maximum(pred[valid], 1e-9)
        g = label[valid]
        self.sum_squared_error += float(((p - g) ** 2).sum())
        self.sum_squared_log_error += float(((np.log(p) - np.log(g)) ** 2).sum())
        self.count += int(g.size)

    def result(self) -> dict:
        if self.count == 0:
            return {"rmse": math.nan, "log_rmse": math.nan}
        return {
            "rmse": math.sqrt(self.sum_squared_error / self.count),
            "log_rmse": math.sqrt(self.sum_squared_log_error / self.count),
        }


def _offset_slices(dy: int, dx: int, h: int, w: int):
    """Slices with `out[dst] <- array[src]` meaning `out[y, x] = array[y + dy, x + dx]` inside the image."""
    src_y, dst_y = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    src_x, dst_x = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    return (src_y, src_x), (dst_y, dst_x)


def _shift(array: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """`out[y, x] = array[y + dy, x + dx]`, `fill` outside the image."""
    out = np.full_like(array, fill)
    src, dst = _offset_slices(dy, dx, *array.shape)
    out[dst] = array[src]
    return out


def _disk_offsets(radius: float) -> list[tuple[int, int]]:
    r = int(math.floor(radius))
    return [
        (dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= radius * radius
    ]


def _within_distance(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose Euclidean distance to the nearest `mask` pixel is at most `radius`."""
    out = np.zeros_like(mask)
    for dy, dx in _disk_offsets(radius):
        src, dst = _offset_slices(dy, dx, *mask.shape)
        out[dst] |= mask[src]
    return out


def _max_within_distance(values: np.ndarray, radius: float) -> np.ndarray:
    out = np.zeros_like(values)
    for dy, dx in _disk_offsets(radius):
        src, dst = _offset_slices(dy, dx, *values.shape)
        np.maximum(out[dst], values[src], out=out[dst])
    return out


def _sample_bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`image` at fractional positions, 0 outside the image."""
    padded = np.pad(image, 2)
    rows = np.clip(rows + 2, 0, padded.shape[0] - 1.001)
    cols = np.clip(cols + 2, 0, padded.shape[1] - 1.001)
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = rows - r0, cols - c0
    width = padded.shape[1]
    flat = padded.ravel()
    index = r0.astype(np.intp) * width + c0.astype(np.intp)  # flat gathers are much faster than 2-D ones
    top = np.take(flat, index) * (1 - fc) + np.take(flat, index + 1) * fc
    bottom = np.take(flat, index + width) * (1 - fc) + np.take(flat, index + width + 1) * fc
    return top * (1 - fr) + bottom * fr


def thin_edge_map(prob: np.ndarray) -> np.ndarray:
    """Non-maximum suppression of an edge probability map `(H, W)`.

    Keeps a pixel when it is not smaller than the map one pixel away on
    either side across the edge (bilinearly interpolated) and larger than at
    least one of the two; other pixels become 0. "Across" is the Hessian
    eigenvector of largest magnitude of a lightly smoothed map, the profile
    direction of a ridge on its crest and flanks alike. This is the thinning
    step of the standard HED / BSDS pipeline, so a wide response is scored as
    one line rather than as many parallel hits.
    """
    prob = np.asarray(prob, dtype=np.float64)
    padded = np.pad(prob, 1, mode="edge")
    smooth = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4.0
    smooth = (smooth[:, :-2] + 2 * smooth[:, 1:-1] + smooth[:, 2:]) / 4.0
    gy, gx = np.gradient(smooth)
    gyy, gyx = np.gradient(gy)
    gxy, gxx = np.gradient(gx)
    cross = 0.5 * (gxy + gyx)
    # Angle (x = column, y = row) of the eigenvector of the larger eigenvalue; a
    # negative trace means the other eigenvalue is the larger in magnitude.
    angle = 0.5 * np.arctan2(2 * cross, gxx - gyy) + np.where(gxx + gyy < 0, np.pi / 2, 0.0)
    rows, cols = np.indices(prob.shape, dtype=np.float64)
    step_r, step_c = np.sin(angle), np.cos(angle)
    ahead = _sample_bilinear(prob, rows + step_r, cols + step_c)
    behind = _sample_bilinear(prob, rows - step_r, cols - step_c)
    keep = (prob > 0) & (prob >= ahead) & (prob >= behind) & ((prob > ahead) | (prob > behind))
    return np.where(keep, prob, 0.0)


class EdgeMeter(Evaluator):
    """Edge detection F-measure at the optimal dataset scale (odsF).

    The official MTLoRA code only reports a loss for edges and scores them
    offline with the BSDS/seism benchmark. This meter approximates that
    benchmark in numpy: predictions are thinned by `thin_edge_map`; a predicted
    edge pixel counts as correct when a ground-truth edge pixel lies within
    `max_dist` x image diagonal (0.0075 as in BSDS), and a ground-truth pixel
    counts as recalled when a thinned prediction lies within that distance.
    Distances are exact Euclidean distance transforms thresholded at the
    tolerance (computed as binary dilations with a disk). Unlike BSDS's
    `correspondPixels` there is no one-to-one assignment, so several
    predictions may match one ground-truth pixel: the score is slightly
    optimistic, and comparable only with itself.

    Counts are pooled over the set per threshold (0.01..0.99, 99 steps);
    `odsF` is the best F over those thresholds.
    """

    def __init__(self, max_dist: float = 0.0075, num_thresholds: int = 99, from_logits: bool = True):
        if max_dist < 0 or num_thresholds < 1:
            raise ConfigError("max_dist must be >= 0 and num_thresholds >= 1")
        self.max_dist = max_dist
        self.thresholds = np.linspace(
            1.0 / (num_thresholds + 1), num_thresholds / (num_thresholds + 1), num_thresholds
        )
        self.from_logits = from_logits
        self.reset()

    def reset(self) -> None:
        n = len(self.thresholds)
        self.predicted = np.zeros(n, dtype=np.int64)
        self.predicted_matched = np.zeros(n, dtype=np.int64)
        self.recalled = np.zeros(n, dtype=np.int64)
        self.edge_pixels = 0

    def _count_at_least(self, values: np.ndarray) -> np.ndarray:
        ordered = np.sort(values.ravel())
        return ordered.size - np.searchsorted(ordered, self.thresholds, side="left")

    def update(self, pred, label) -> None:
        label = _as_maps(label, "label")
        pred = _as_maps(pred, "pred").astype(np.float64)
        _check_same_shape(pred, label)
        prob = _sigmoid(pred) if self.from_logits else pred
        for image_prob, image_label in zip(prob, label, strict=True):
            height, width = image_label.shape
            radius = self.max_dist * math.hypot(height, width)
            gt = (image_label >= 0.5) & (image_label != IGNORE_INDEX)
            thin = thin_edge_map(image_prob)
            near_gt = _within_distance(gt, radius)
            self.predicted += self._count_at_least(thin[thin > 0])
            self.predicted_matched += self._count_at_least(thin[(thin > 0) & near_gt])
            self.recalled += self._count_at_least(_max_within_distance(thin, radius)[gt])
            self.edge_pixels += int(gt.sum())

    def result(self) -> dict:
        precision = self.predicted_matched / np.maximum(self.predicted, 1)
        recall = self.recalled / max(self.edge_pixels, 1)
        f = np.where(
            precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0
        )
        best = int(np.argmax(f))
        return {
            "odsF": 100.0 * float(f[best]),
            "ods_threshold": float(self.thresholds[best]),
            "precision": 100.0 * float(precision[best]),
            "recall": 100.0 * float(recall[best]),
        }


def make_evaluator(task: str, num_classes: int | None = None) -> Evaluator:
    """The meter of `task`'s primary metric, registered on its kind's row; class maps need `num_classes`.

    Saliency and edge meters take logits, as the model heads produce them.
    """
    spec = get_task(task)
    factory = spec.spec.meters.get(spec.metric)
    if factory is None:
        raise ConfigError(f"no meter for the {spec.metric} of {spec.kind} task {task!r}; register one with "
                          "mtlora.tasks.register_meter")
    return factory(task, num_classes)


@register_meter(CLASS_MAP, "mIoU")
def _segmentation_meter(task: str, num_classes: int | None) -> Evaluator:
    if num_classes is None:
        raise ConfigError(f"task {task!r} needs num_classes to build its evaluator")
    return SegmentationMeter(num_classes)


# The meters that need nothing but the task's kind and metric.
for (_kind, _metric), _meter in {(BINARY_MAP, "mIoU"): SaliencyMeter, (BINARY_MAP, "odsF"): EdgeMeter,
                                 (NORMALS, "mean"): NormalsMeter, (DEPTH, "rmse"): DepthMeter}.items():
    register_meter(_kind, _metric)(lambda task, num_classes, meter=_meter: meter())


def multi_task_delta(
    results: Mapping[str, float | Mapping[str, float]],
    baselines: Mapping[str, float] = PASCAL_SINGLE_TASK_BASELINES,
    lower_is_better: Iterable[str] | None = None,
) -> float:
    """Mean relative improvement over single-task baselines, in percent (the paper's Delta_m).

    `results` maps task -> primary metric, or task -> a meter's result dict
    (its `TASK_METRICS` entry is picked). For tasks in `lower_is_better`
    (default: those whose primary metric is an error, normals and depth) the
    sign is flipped, so a positive delta is always better.
    """
    if not results:
        raise ConfigError("multi_task_delta needs results for at least one task")
    if lower_is_better is None:
        lower_is_better = {task for task, (_, higher) in TASK_METRICS.items() if not higher}
    lower = set(lower_is_better)
    total = 0.0
    for task, value in results.items():
        if task not in baselines:
            raise ConfigError(
                f"no baseline for task {task!r}; baselines exist for: {', '.join(sorted(baselines))}"
            )
        if isinstance(value, Mapping):
            if task not in TASK_METRICS:
                raise ConfigError(f"unknown task {task!r}; pass its primary metric as a number instead")
            value = value[TASK_METRICS[task][0]]
        baseline = float(baselines[task])
        relative = (float(value) - baseline) / baseline
        total += -relative if task in lower else relative
    return 100.0 * total / len(results)

