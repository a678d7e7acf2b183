"""`mtlora.evaluate`: streaming metrics over a data set, Delta_m, baselines, reports."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlora.config import ModelConfig, SwinConfig
from mtlora.data.datasets import build_dataset
from mtlora.data.synthetic import SYNTHETIC_TASKS
from mtlora.errors import ConfigError, DataError
from mtlora.evaluate import (
    default_baselines,
    evaluate,
    format_results,
    json_ready,
    load_baselines,
    worker_error,
)
from mtlora.losses import MultiTaskLoss
from mtlora.metrics import PASCAL_SINGLE_TASK_BASELINES

TASKS = ("semseg", "human_parts", "sal", "normals")


class ReplayModel(nn.Module):
    """Predicts from the labels of the samples it is shown in order: perfect, or a constant guess."""

    def __init__(self, dataset, perfect: bool = True):
        super().__init__()
        self.tasks = TASKS
        self.config = ModelConfig(swin=SwinConfig.from_variant("swin_micro", img_size=32), tasks=TASKS,
                                  task_channels={t: SYNTHETIC_TASKS[t] for t in TASKS})
        self.dataset, self.perfect, self.seen = dataset, perfect, 0
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, image):
        samples = [self.dataset[self.seen + i] for i in range(image.shape[0])]
        self.seen += image.shape[0]
        outputs = []
        for task in self.tasks:
            label = torch.stack([s[task] for s in samples])
            if not self.perfect:
                label = torch.zeros_like(label)
            if task in ("semseg", "human_parts"):
                classes = self.config.task_channels[task]
                hot = F.one_hot(torch.where(label == 255, 0, label), classes).permute(0, 3, 1, 2).float()
                outputs.append(10 * hot)
            elif task == "sal":
                outputs.append(20 * label - 10)
            else:
                outputs.append(label + (0 if self.perfect else torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)))
        return tuple(outputs)


@pytest.fixture(scope="module")
def val_set():
    return build_dataset("synthetic", None, "val", TASKS, 32, train=False, num_samples=10)


def test_perfect_predictions_score_perfectly(val_set):
    model = ReplayModel(val_set).train()
    results = evaluate(model, val_set, TASKS, batch_size=4, criterion=MultiTaskLoss(TASKS))
    assert results["num_samples"] == 10
    assert model.training  # restored after evaluation
    assert results["tasks"]["semseg"]["pixel_accuracy"] == pytest.approx(100.0)
    present = [iou for iou in results["tasks"]["semseg"]["IoU"] if iou > 0]
    assert present and all(iou == pytest.approx(100.0) for iou in present)
    assert results["tasks"]["sal"]["mIoU"] == pytest.approx(100.0)
    assert results["tasks"]["sal"]["maxF"] == pytest.approx(100.0, abs=1e-6)
    assert results["tasks"]["normals"]["mean"] == pytest.approx(0.0, abs=0.05)
    assert results["primary"]["normals"] == {"metric": "mean", "value": results["tasks"]["normals"]["mean"],
                                             "higher_is_better": False}
    assert results["delta_m"] is None and results["baselines"] is None
    assert set(results["loss"]) == {"total", *TASKS}


def test_a_constant_guess_scores_worse_and_delta_m_says_so(val_set):
    perfect = evaluate(ReplayModel(val_set), val_set, TASKS, batch_size=3)
    baselines = {t: v["value"] for t, v in perfect["primary"].items()}
    baselines["normals"] = 10.0  # an error of 0 degrees cannot be a baseline
    guess = evaluate(ReplayModel(val_set, perfect=False), val_set, TASKS, batch_size=3, baselines=baselines)
    for task in ("semseg", "sal"):
        assert guess["tasks"][task]["mIoU"] < perfect["tasks"][task]["mIoU"] - 20
    assert guess["tasks"]["normals"]["mean"] > 20
    assert guess["delta_m"] < -50
    # The same results through the table and strict JSON.
    table = format_results(guess)
    assert "semseg" in table and "mIoU*" in table and "delta_m" in table
    json.dumps(json_ready(guess), allow_nan=False)


def test_delta_m_needs_a_baseline_for_every_task(val_set):
    results = evaluate(ReplayModel(val_set), val_set, TASKS, batch_size=5, baselines={"semseg": 50.0})
    assert results["delta_m"] is None
    assert "not reported" in format_results(results)


def test_evaluate_refuses_tasks_it_cannot_score(val_set):
    with pytest.raises(ConfigError, match="no task"):
        evaluate(ReplayModel(val_set), val_set, ("depth",))
    two_tasks = build_dataset("synthetic", None, "val", ("semseg", "sal"), 32, train=False, num_samples=2)
    with pytest.raises(DataError, match="no labels for task"):
        evaluate(ReplayModel(two_tasks), two_tasks, TASKS)


def test_baselines_come_from_the_paper_or_from_json(tmp_path):
    assert default_baselines("pascal") == PASCAL_SINGLE_TASK_BASELINES
    assert default_baselines("synthetic") is None
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"semseg": 40.0, "sal": 60}))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"tasks": {"normals": {"mean": 20.5, "rmse": 25.0}}}))
    assert load_baselines([plain, report]) == {"semseg": 40.0, "sal": 60.0, "normals": 20.5}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"semseg": "high"}))
    with pytest.raises(ConfigError, match="non-zero number"):
        load_baselines([bad])
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_baselines([bad])


def test_worker_errors_are_cut_to_their_message():
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DataError(...)\n'
        "mtlora.errors.DataError: image file is corrupt or truncated: a.jpg; re-copy it\n"
    )
    assert worker_error(wrapped) == "image file is corrupt or truncated: a.jpg; re-copy it"
    assert worker_error(DataError("plain message")) == "plain message"
