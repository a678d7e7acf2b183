"""Per-task losses against hand-computed values, and their weighted sum."""

import math

import pytest
import torch

from mtlora.errors import ConfigError
from mtlora.losses import (
    DEFAULT_LOSS_WEIGHTS,
    MultiTaskLoss,
    balanced_bce_loss,
    depth_loss,
    normals_loss,
    segmentation_loss,
)

LN2 = math.log(2.0)


def test_segmentation_cross_entropy_skips_ignored_pixels():
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, 1, 0, 0] = 100.0  # confident and right on the one pixel that would change the mean
    label = torch.tensor([[[1, 2], [3, 255]]])
    # Pixel (0, 0) ~ 0; (0, 1) and (1, 0) are uniform over 4 classes -> ln 4; (1, 1) ignored.
    assert segmentation_loss(logits, label).item() == pytest.approx(2 * math.log(4) / 3, rel=1e-5)


def test_segmentation_all_ignored_is_zero_with_gradient():
    logits = torch.randn(2, 7, 3, 3, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 3, 3), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and not torch.isnan(logits.grad).any()


def test_saliency_balanced_bce():
    # Zero logits -> BCE ln 2 per pixel; 1 positive, 3 negatives -> weight 3/4 on positives.
    label = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    loss = balanced_bce_loss(torch.zeros(1, 1, 2, 2), label)
    assert loss.item() == pytest.approx((0.75 * LN2 * 1 + 0.25 * LN2 * 3) / 4)


def test_edge_bce_uses_fixed_positive_weight():
    label = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    loss = balanced_bce_loss(torch.zeros(1, 1, 2, 2), label, positive_weight=0.95)
    assert loss.item() == pytest.approx((0.95 * LN2 * 1 + 0.05 * LN2 * 3) / 4)


def test_normals_l1_on_unit_predictions_over_valid_pixels():
    pred = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]).T.reshape(1, 3, 1, 3)
    label = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    # Pixel 0: |(1,0,0) - (1,0,0)| = 0; pixel 1: |(0,1,0) - (1,0,0)| = 2; pixel 2 ignored -> 2 / 6 components.
    assert normals_loss(pred, label).item() == pytest.approx(1 / 3)


def test_depth_l1_over_measured_pixels():
    pred = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    label = torch.tensor([[[[1.0, 0.0, 5.0]]]])
    assert depth_loss(pred, label).item() == pytest.approx(1.0)


def test_multi_task_loss_weights_and_total():
    tasks = ["semseg", "sal", "depth"]
    preds = {
        "semseg": torch.zeros(1, 4, 1, 2),
        "sal": torch.zeros(1, 1, 2, 2),
        "depth": torch.tensor([[[[1.0, 2.0, 3.0]]]]),
    }
    targets = {
        "semseg": torch.tensor([[[0, 3]]]),
        "sal": torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]),
        "depth": torch.tensor([[[[1.0, 0.0, 5.0]]]]),
    }
    total, per_task = MultiTaskLoss(tasks)(preds, targets)
    assert per_task["semseg"].item() == pytest.approx(math.log(4), rel=1e-6)
    expected = 1.0 * math.log(4) + 5.0 * (1.5 * LN2 / 4) + 1.0 * 1.0
    assert total.item() == pytest.approx(expected, rel=1e-6)
    custom, _ = MultiTaskLoss(tasks, {"depth": 3.0})(preds, targets)
    assert custom.item() == pytest.approx(expected + 2.0, rel=1e-6)


def test_multi_task_loss_rejects_bad_configuration():
    assert DEFAULT_LOSS_WEIGHTS == {
        "semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0, "depth": 1.0
    }  # fmt: skip
    with pytest.raises(ConfigError, match="known tasks"):
        MultiTaskLoss(["semseg", "flow"])
    with pytest.raises(ConfigError, match="not trained"):
        MultiTaskLoss(["semseg"], {"edge": 1.0})
    with pytest.raises(ConfigError, match="lack"):
        MultiTaskLoss(["semseg"])({}, {})
    with pytest.raises(ConfigError, match="label resolution"):
        segmentation_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))
