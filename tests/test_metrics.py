"""Every metric against values worked out by hand on tiny arrays."""

import math

import numpy as np
import pytest

from mtlora.errors import ConfigError, DataError
from mtlora.metrics import (
    PASCAL_SINGLE_TASK_BASELINES,
    TASK_METRICS,
    DepthMeter,
    EdgeMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    make_evaluator,
    multi_task_delta,
    thin_edge_map,
)

# Valid pixels (label, pred): (0,0) (0,1) (1,1) (1,1) (2,2); the 255 pixel is skipped.
# IoU: class 0 = 1/2, class 1 = 2/3, class 2 = 1/1.
SEG_LABEL = np.array([[0, 0, 1], [1, 2, 255]])
SEG_PRED = np.array([[0, 1, 1], [1, 2, 0]])


def test_segmentation_miou_from_label_maps():
    meter = SegmentationMeter(3)
    meter.update(SEG_PRED, SEG_LABEL)
    result = meter.result()
    assert result["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert result["IoU"] == pytest.approx([50.0, 200 / 3, 100.0])
    assert result["pixel_accuracy"] == pytest.approx(80.0)


def test_segmentation_accepts_logits_and_streams():
    logits = np.eye(3, dtype=np.float32)[SEG_PRED].transpose(2, 0, 1)[None]  # (1, 3, 2, 3)
    streamed = SegmentationMeter(3)
    streamed.update(logits[:, :, :1], SEG_LABEL[None, :1])  # first row
    streamed.update(logits[:, :, 1:], SEG_LABEL[None, 1:])  # second row
    assert streamed.result()["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)


def test_segmentation_absent_class_scores_zero_as_upstream():
    meter = SegmentationMeter(4)
    meter.update(SEG_PRED, SEG_LABEL)
    assert meter.result()["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 + 0) / 4)


def test_segmentation_rejects_bad_labels_and_shapes():
    meter = SegmentationMeter(3)
    with pytest.raises(DataError, match="label value 7"):
        meter.update(np.zeros((2, 2), int), np.full((2, 2), 7))
    with pytest.raises(ConfigError, match="does not match"):
        meter.update(np.zeros((2, 3), int), np.zeros((2, 2), int))
    assert math.isnan(SegmentationMeter(3).result()["mIoU"])


# Salient pixels: 0.95 and 0.32. Thresholds 0.20..0.90 step 0.05:
#   t < 0.32        -> {0.95, 0.52, 0.32}: IoU 2/3, P 2/3, R 1, F 0.8
#   0.32 <= t < .52 -> {0.95, 0.52}:       IoU 1/3, P 1/2, R 1/2, F 0.5
#   t >= 0.55       -> {0.95}:             IoU 1/2, P 1,   R 1/2, F 2/3
SAL_PROB = np.array([[0.95, 0.52], [0.32, 0.10]])
SAL_LABEL = np.array([[1, 0], [1, 0]])


def test_saliency_single_image():
    meter = SaliencyMeter(from_logits=False)
    meter.update(SAL_PROB, SAL_LABEL)
    result = meter.result()
    assert result["mIoU"] == pytest.approx(100 * 2 / 3)
    assert result["maxF"] == pytest.approx(80.0)
    # Pooled F_beta, beta^2 = 0.3, best at t in (0.52, 0.95): P = 1, R = 1/2 -> 1.3 * 0.5 / (0.3 + 0.5).
    assert result["beta_maxF"] == pytest.approx(100 * 1.3 * 0.5 / 0.8)


def test_saliency_averages_images_and_takes_logits():
    meter = SaliencyMeter()  # logits
    logits = np.log(SAL_PROB / (1 - SAL_PROB))
    meter.update(logits[None, None], SAL_LABEL[None, None])
    # An image with nothing salient and nothing predicted: IoU 1, P = R = 0 at every threshold.
    meter.update(np.full((1, 1, 2, 2), math.log(0.1 / 0.9)), np.zeros((1, 1, 2, 2)))
    result = meter.result()
    assert result["mIoU"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    # Low thresholds: mean P = 1/3, mean R = 1/2 -> F = 0.4 (the best).
    assert result["maxF"] == pytest.approx(40.0)


def test_saliency_ignores_void_pixels():
    meter = SaliencyMeter(from_logits=False)
    meter.update(np.array([[0.9, 0.9]]), np.array([[1, 255]]))
    assert meter.result()["mIoU"] == pytest.approx(100.0)


def test_normals_angular_errors():
    # Pixels: exact (scaled) -> 0 deg, orthogonal -> 90 deg, half-way -> 45 deg, ignored (zero label).
    pred = np.array([[2, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32).T.reshape(1, 3, 1, 4)
    label = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32).T.reshape(1, 3, 1, 4)
    meter = NormalsMeter()
    meter.update(pred, label)
    result = meter.result()
    assert result["mean"] == pytest.approx(45.0, abs=1e-6)
    assert result["rmse"] == pytest.approx(math.sqrt((0 + 90**2 + 45**2) / 3), abs=1e-6)
    assert result["median"] == pytest.approx(45.0, abs=0.01)
    assert result["11.25"] == pytest.approx(100 / 3)
    assert result["30"] == pytest.approx(100 / 3)


def test_normals_treat_255_as_ignore():
    meter = NormalsMeter()
    meter.update(np.ones((3, 1, 2)), np.array([[[1.0, 255]], [[1.0, 255]], [[1.0, 255]]]))
    assert meter.count == 1
    assert meter.result()["mean"] == pytest.approx(0.0, abs=1e-5)


def test_depth_rmse_over_valid_pixels():
    meter = DepthMeter()
    meter.update(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 0.0], [5.0, 2.0]]))
    result = meter.result()
    assert result["rmse"] == pytest.approx(math.sqrt((0 + 4 + 4) / 3))
    assert result["log_rmse"] == pytest.approx(math.sqrt((math.log(3 / 5) ** 2 + math.log(2) ** 2) / 3))


def test_edge_thinning_keeps_ridge_centre():
    prob = np.zeros((7, 7))
    prob[:, 2], prob[:, 3], prob[:, 4] = 0.3, 0.9, 0.3
    thin = thin_edge_map(prob)
    assert np.array_equal(np.nonzero(thin.any(axis=0))[0], [3])
    rows, cols = np.mgrid[0:12, 0:12]
    diagonal = np.exp(-((cols - rows) ** 2) / 8.0)  # a blurred line along the main diagonal
    assert np.array_equal(thin_edge_map(diagonal) > 0, np.eye(12, dtype=bool))


def test_edge_ods_f():
    # 10x10; ground truth: column 2. Prediction: column 3, rows 0-5 at 0.9 (one pixel off: matched),
    # and column 6 at 0.6 (4 pixels off: unmatched). Tolerance radius 1.5 px.
    label = np.zeros((10, 10))
    label[:, 2] = 1
    prob = np.zeros((10, 10))
    prob[:6, 3] = 0.9
    prob[:, 6] = 0.6
    meter = EdgeMeter(max_dist=1.5 / math.hypot(10, 10), from_logits=False)
    meter.update(prob, label)
    result = meter.result()
    # Recalled ground truth: rows 0-5 (1 px away) and row 6 (sqrt(2) px from (5, 3)) = 7/10.
    # t in (0.6, 0.9]: P = 6/6, R = 7/10 -> F = 14/17; t <= 0.6: P = 6/16, R = 7/10 -> F ~ 0.49.
    assert result["odsF"] == pytest.approx(100 * 14 / 17)
    assert result["precision"] == pytest.approx(100.0)
    assert result["recall"] == pytest.approx(70.0)
    assert 0.6 < result["ods_threshold"] <= 0.9


def test_edge_exact_match_when_tolerance_below_a_pixel():
    label = np.zeros((4, 4))
    label[1, 1] = 1
    prob = np.zeros((4, 4))
    prob[1, 2] = 0.9  # one pixel off, tolerance 0.0075 * diag < 1 px
    meter = EdgeMeter(from_logits=False)
    meter.update(prob, label)
    assert meter.result()["odsF"] == 0.0


def test_multi_task_delta():
    delta = multi_task_delta({"semseg": 70.0, "normals": 17.0})
    assert delta == pytest.approx(100 * ((70.0 - 67.21) / 67.21 - (17.0 - 17.97) / 17.97) / 2)
    from_dicts = multi_task_delta({"semseg": {"mIoU": 70.0}, "normals": {"mean": 17.0, "rmse": 30.0}})
    assert from_dicts == pytest.approx(delta)
    assert multi_task_delta(PASCAL_SINGLE_TASK_BASELINES) == pytest.approx(0.0)
    # Depth: lower is better by default.
    assert multi_task_delta({"depth": 0.5}, baselines={"depth": 0.6}) == pytest.approx(100 * 0.1 / 0.6)
    assert multi_task_delta({"edge": 0.5}, {"edge": 0.6}, lower_is_better=["edge"]) == pytest.approx(100 / 6)
    with pytest.raises(ConfigError, match="no baseline"):
        multi_task_delta({"edge": 70.0})


def test_make_evaluator_table():
    assert TASK_METRICS["normals"] == ("mean", False)
    assert isinstance(make_evaluator("semseg", 21), SegmentationMeter)
    assert isinstance(make_evaluator("edge"), EdgeMeter)
    with pytest.raises(ConfigError, match="num_classes"):
        make_evaluator("human_parts")
    with pytest.raises(ConfigError, match="known tasks"):
        make_evaluator("optical_flow")
