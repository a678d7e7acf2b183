"""A new kind of task is one row plus its registered functions (docs/architecture.md, "A new task kind"):
a toy kind, added here and nowhere in the package, goes through training, export, an engine build and its
accuracy check, and `mtlora-export check` judges it again."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from export.checking.tolerances import Tolerances
from export.cli import main as export_cli
from mtlora import tasks
from mtlora.cli.options import model_config_from_options
from mtlora.data import synthetic, transforms
from mtlora.losses import LOSSES, register_loss
from mtlora.metrics import Evaluator
from mtlora.train import TrainConfig, train

KIND, TASK = "brightness_map", "brightness"


class MeanAbsoluteError(Evaluator):
    """Mean absolute error of a (N, 1, H, W) map, in label units."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, pred, label) -> None:
        diff = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(label, dtype=np.float64))
        self.total += float(diff.sum())
        self.count += diff.size

    def result(self) -> dict:
        return {"mae": self.total / self.count if self.count else math.nan}


@pytest.fixture
def toy_kind():
    """The brightness of each pixel, in [0, 1]: a regression kind with its own meter, loss, label layout and
    synthetic label. Removed again afterwards, so no other test sees it."""
    tasks.register_kind(tasks.TaskKind(KIND, agreement=None, activation="none"))
    tasks.register_meter(KIND, "mae")(lambda task, num_classes: MeanAbsoluteError())
    register_loss("brightness_l1")(lambda pred, label: (pred - label).abs().mean())
    tasks.register_task(tasks.Task(TASK, KIND, 1, "mae", False, "brightness_l1", 1.0))
    transforms.register_label_layout(KIND, transforms.LabelLayout(
        resample=lambda value, warp: warp(value.astype(np.float32), transforms.LINEAR, 0.0),
        to_model=lambda value, task: value.astype(np.float32)[None]))
    synthetic.register_synthetic_label(TASK, channels=1)(
        lambda scene: (scene.image.astype(np.float32) / 255.0).mean(axis=-1))
    yield
    for table, key in ((tasks.KINDS, KIND), (tasks.TASKS, TASK), (LOSSES, "brightness_l1"),
                       (transforms.LABEL_LAYOUTS, KIND), (synthetic.SYNTHETIC_TASKS, TASK),
                       (synthetic.SYNTHETIC_LABELS, TASK)):
        table.pop(key)


def test_a_toy_kind_trains_exports_builds_and_checks(toy_kind, tmp_path):
    # Its defaults come from its row: tensor limits, no agreement, its metric's drop.
    limits = Tolerances().for_task("fp16", TASK)
    assert (limits.min_cosine, limits.max_metric_drop, limits.min_argmax_agreement) == (0.999, 0.5, None)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = model_config_from_options(preset="default", img_size=32, decoder_channels=(8, 16, 32, 64),
                                           tasks=("semseg", TASK))
        run = tmp_path / "run"
        result = train(config, TrainConfig(data="synthetic", epochs=1, warmup_epochs=0.5, batch_size=8, train_samples=16,
                                           val_samples=8, eval_every=1, workers=0, threads=1, seed=0, slim=True),
                       run, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.metrics["primary"][TASK]["metric"] == "mae"
    assert 0 < result.metrics["tasks"][TASK]["mae"] < 10

    out = tmp_path / "build"
    invoke = CliRunner().invoke
    built = invoke(export_cli, ["build", str(run), "--backend", "onnxruntime", "--precision", "fp32",
                                "--eval-samples", "4", "--out", str(out)])
    assert built.exit_code == 0, built.output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["model"]["tasks"] == ["semseg", TASK]
    toy = report["engines"][0]["tasks"][TASK]
    assert toy["tensor"]["max_abs"] <= 1e-3
    # The synthetic evaluation set carries its labels, so its meter ran on engine and reference alike.
    assert toy["metrics"]["primary"] == "mae" and toy["metrics"]["engine"]["mae"] == pytest.approx(
        toy["metrics"]["reference"]["mae"], abs=1e-4)
    # fp32 limits from its row and the fp32 levels: tensor agreement only.
    assert {c["name"] for c in toy["checks"]} == {"max_abs", "cosine"}
    assert TASK in (out / "report.html").read_text()

    checked = invoke(export_cli, ["check", str(out)])
    assert checked.exit_code == 0, checked.output
