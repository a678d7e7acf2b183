"""A `mtlora train` that fails leaves its --out as it found it (absent, or the previous good run, byte for byte),
so the corrected re-run is not refused; out-of-range or non-finite options and resumed settings are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mtlora.cli import main as mtlora_cli
from mtlora.errors import DataError
from mtlora.train import LAST_DIR, METRICS_FILE, TRAINING_STATE_JSON, train
from mtlora.train.trainer import Trainer
from tests.conftest import invoke
from tests.test_train import tiny_model_config, tiny_train_config
from tests.test_train_hostile import TINY_FLAGS, _snapshot

ONE_EPOCH = [*TINY_FLAGS, "--data", "synthetic", "--epochs", "1"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-failures") / "run"
    train(tiny_model_config(), tiny_train_config(epochs=2, train_samples=16, val_samples=8), out, progress=False)
    return out


def _fail_in_epoch(monkeypatch, failing_epoch: int) -> None:
    """Training fails partway, as on a bad sample or a divergence: after the first epoch's log and last/."""
    real = Trainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == failing_epoch:
            raise DataError("sample 7: damaged label")
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


@pytest.mark.parametrize("failing_epoch", [1, 2])
def test_a_failed_forced_run_leaves_the_previous_run_untouched(failing_epoch, good_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = _snapshot(run)
    _fail_in_epoch(monkeypatch, failing_epoch)
    code, output = invoke(mtlora_cli, "train", *TINY_FLAGS, "--data", "synthetic", "--epochs", "2", "--lr", "0.01",
                          "--save-every", "1", "--eval-every", "1", "--out", run, "--force")
    assert code == 1 and "Traceback" not in output and "damaged label" in output, output
    assert _snapshot(run) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in good_run.iterdir())


def test_a_failed_run_into_a_new_out_leaves_nothing_and_the_rerun_goes_ahead(tmp_path, monkeypatch):
    out = tmp_path / "new"
    with monkeypatch.context() as patch:
        _fail_in_epoch(patch, 1)
        code, output = invoke(mtlora_cli, "train", *TINY_FLAGS, "--data", "synthetic", "--epochs", "2",
                              "--save-every", "1", "--eval-every", "1", "--out", out)
        assert code == 1 and "damaged label" in output and len(output.strip().splitlines()) == 1, output
    assert not out.exists()
    code, output = invoke(mtlora_cli, "train", *TINY_FLAGS, "--data", "synthetic", "--epochs", "2", "--out", out)
    assert code == 0, output
    assert [json.loads(line)["epoch"] for line in (out / METRICS_FILE).read_text().splitlines()][-2:] == [1, 2]


def test_a_run_that_fails_after_a_checkpoint_keeps_it_for_resume(tmp_path, monkeypatch):
    # Hours of training are not thrown away for a bad sample in the last epoch.
    out = tmp_path / "new"
    with monkeypatch.context() as patch:
        _fail_in_epoch(patch, 2)
        code, output = invoke(mtlora_cli, "train", *TINY_FLAGS, "--data", "synthetic", "--epochs", "2",
                              "--save-every", "1", "--eval-every", "1", "--no-slim", "--out", out)
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "damaged label" in lines[0], output
    assert f"the last checkpoint is kept: continue with --resume {out / 'last'}" in lines[0]
    code, output = invoke(mtlora_cli, "train", "--resume", out / "last", "--out", out, "--quiet")
    assert code == 0, output
    assert [json.loads(line)["epoch"] for line in (out / METRICS_FILE).read_text().splitlines()][-2:] == [1, 2]


def test_an_interrupted_run_keeps_last_for_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def interrupted(self, epoch):
        raise KeyboardInterrupt

    real = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: (real if epoch == 1 else interrupted)(self, epoch))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_config(), tiny_train_config(epochs=2, train_samples=16, val_samples=8), out, progress=False)
    assert (out / LAST_DIR / TRAINING_STATE_JSON).is_file()
    assert not any(p.name.startswith(".") for p in out.iterdir())


@pytest.mark.parametrize("flag, value, words", [
    ("--shared-scale", "nan", "positive finite"), ("--shared-scale", "inf", "positive finite"),
    ("--task-scale", "nan", "positive finite"), ("--task-scale", "-inf", "positive finite"),
    ("--drop-path", "nan", "not a finite number"),
    ("--seed", "99999999999999999999999", "0<=x<=4294967295"),
    ("--threads", "100000", "1<=x<=1024"), ("--threads", "99999999999999999999999", "1<=x<=1024"),
    ("--workers", "99999999999999999999999", "0<=x<=256"),
    ("--train-samples", "99999999999999999999999", "1<=x<=100000000"),
    ("--weight-decay", "1e30", "0<=x<=10"),
    ("--decoder-heads", "semseg=aspp,semseg=hrnet", "'semseg' is given a head twice"),
])
def test_out_of_range_options_are_one_line_before_any_work(flag, value, words, tmp_path):
    code, output = invoke(mtlora_cli, "train", *ONE_EPOCH, flag, value, "--out", tmp_path / "out")
    assert code == 2 and "Traceback" not in output and words in output.strip().splitlines()[-1], output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("baselines, words", [
    ({"foo": 1}, "unknown task(s) 'foo'"),
])
def test_baselines_naming_an_unknown_task_are_refused(baselines, words, good_run, tmp_path):
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(baselines))
    code, output = invoke(mtlora_cli, "train", *ONE_EPOCH, "--baseline-json", path, "--out", tmp_path / "out")
    assert code == 2 and words in output.strip().splitlines()[-1] and "Traceback" not in output, output
    assert not (tmp_path / "out").exists()
    code, output = invoke(mtlora_cli, "evaluate", good_run, "--data", "synthetic", "--samples", "8",
                          "--baseline-json", path)
    assert code == 2 and words in output.strip().splitlines()[-1], output


def _edit(key, value):
    def edit(config: dict) -> None:
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    return edit


DELETE = object()

SETTINGS_CASES = {
    "no_epochs": (_edit("epochs", DELETE), "has no 'epochs'"),
    "seed_huge": (_edit("seed", 10**30), "seed must be at most"),
    "threads_huge": (_edit("threads", 10**30), "threads must be at most"),
    "train_samples_huge": (_edit("train_samples", 10**30), "train_samples must be at most"),
    "loss_weight_negative": (_edit("loss_weights", {"semseg": -1.0}), "loss_weights.semseg = -1.0"),
    "loss_weights_all_zero": (_edit("loss_weights", {"semseg": 0.0, "normals": 0.0}), "all zero"),
    "loss_weight_unknown_task": (_edit("loss_weights", {"foo": 1.0}), "unknown task(s) 'foo'"),
    "baseline_zero": (_edit("baselines", {"semseg": 0}), "baselines.semseg = 0"),
    "min_lr_ratio_huge": (_edit("min_lr_ratio", 1e30), "must be at most 1"),
    "weight_decay_huge": (_edit("weight_decay", 1e30), "weight_decay must be at most 10.0"),
}


@pytest.mark.parametrize("name", sorted(SETTINGS_CASES))
def test_resumed_settings_are_checked_as_strictly_as_the_command_line(name, good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    edit, words = SETTINGS_CASES[name]
    state_path = run / LAST_DIR / TRAINING_STATE_JSON
    state = json.loads(state_path.read_text())
    edit(state["train_config"])
    state_path.write_text(json.dumps(state))
    before = _snapshot(run)
    code, output = invoke(mtlora_cli, "train", "--resume", run, "--out", run, "--epochs", "3", "--quiet")
    assert code == 1 and "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], output
    assert _snapshot(run) == before
