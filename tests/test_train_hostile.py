"""Hostile input to `mtlora train`: a damaged or edited resume state (every field, wrong types, negative, NaN
and Inf numbers, an epoch beyond the schedule) and an --out holding someone else's files are refused with one
line, exit 1, before anything in the run directory changes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mtlora.cli import main as mtlora_cli
from mtlora.train import LAST_DIR, METRICS_FILE, TRAINING_STATE_JSON, train
from tests.conftest import invoke
from tests.test_train import tiny_model_config, tiny_train_config

TINY_FLAGS = ["--preset", "default", "--img-size", "32", "--decoder-channels", "8,16,32,64", "--batch-size", "8",
              "--train-samples", "16", "--val-samples", "8", "--workers", "0", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-epoch run with last/, best/ and a metrics log of 2 records."""
    out = tmp_path_factory.mktemp("train-hostile") / "run"
    train(tiny_model_config(), tiny_train_config(epochs=2, train_samples=16, val_samples=8), out, progress=False)
    return out


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _set(path: str, value):
    """An edit of training_state.json: the field at the dotted path set to `value` (or removed for DELETE)."""
    def edit(state: dict) -> None:
        *parents, last = path.split(".")
        node = state
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


DELETE = object()
NAN, INF = float("nan"), float("inf")

# name -> (edit of the state, words the one line must hold)
STATE_CASES = {
    "epoch_negative": (_set("epoch", -5), "epoch must be >= 0, got -5"),
    "epoch_a_string": (_set("epoch", "2"), "epoch must be a whole number"),
    "epoch_a_float": (_set("epoch", 1.5), "epoch must be a whole number"),
    "epoch_true": (_set("epoch", True), "epoch must be a whole number"),
    "epoch_nan": (_set("epoch", NAN), "epoch is not a finite number"),
    "epoch_beyond_schedule": (_set("epoch", 9), "epoch 9 lies beyond the run's schedule of 2 epochs"),
    "epoch_missing": (_set("epoch", DELETE), "'epoch' is missing"),
    "step_negative": (_set("step", -1), "step must be >= 0"),
    "step_inf": (_set("step", INF), "step is not a finite number"),
    "step_below_epochs": (_set("step", 1), "step 1 is fewer than one optimiser step per finished epoch"),
    "step_missing": (_set("step", DELETE), "'step' is missing"),
    "seconds_negative": (_set("seconds", -3.0), "seconds is out of range"),
    "seconds_nan": (_set("seconds", NAN), "seconds is not a finite number"),
    "seconds_a_list": (_set("seconds", [1]), "seconds must be a finite number"),
    "best_value_nan": (_set("best.value", NAN), "best.value is not a finite number"),
    "best_criterion_unknown": (_set("best.criterion", "accuracy"), "best.criterion must be one of"),
    "best_epoch_after_checkpoint": (_set("best.epoch", 7), "best.epoch 7 is after the checkpoint's epoch 2"),
    "best_a_number": (_set("best", 3), "best must be an object"),
    "world_size_zero": (_set("world_size", 0), "world_size must be >= 1"),
    "train_config_a_list": (_set("train_config", []), "train_config must be an object"),
    "train_config_epochs_a_string": (_set("train_config.epochs", "2"), "epochs must be a whole number"),
    "train_config_lr_inf": (_set("train_config.lr", INF), "train_config.lr is not a finite number"),
    "train_config_weight_decay_negative": (_set("train_config.weight_decay", -1.0), "must be >= 0"),
    "train_config_unknown_option": (_set("train_config.colour", "red"), "unknown training option(s): colour"),
    "train_config_missing": (_set("train_config", DELETE), "'train_config' is missing"),
    "optimizer_missing": (_set("optimizer", DELETE), "'optimizer' is missing"),
    "optimizer_names_not_strings": (_set("optimizer.names.0", 5), "optimizer.names[0] must be a string"),
    "optimizer_eps_zero": (_set("optimizer.param_groups.0.eps", 0), "param_groups[0].eps is out of range"),
    "optimizer_weight_decay_nan": (_set("optimizer.param_groups.1.weight_decay", NAN), "is not a finite number"),
    "optimizer_betas_above_one": (_set("optimizer.param_groups.0.betas", [0.9, 1.5]), "betas must be two numbers"),
    "optimizer_one_group": (lambda s: s["optimizer"]["param_groups"].pop(), "must hold 2 groups"),
    "scaler_scale_negative": (_set("scaler", {"scale": -1.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                              "growth_interval": 2000, "_growth_tracker": 0}), "scaler.scale is out of range"),
    "scaler_missing_fields": (_set("scaler", {"scale": 2.0}), "scaler must have the fields"),
    "unknown_field": (_set("colour", "red"), "unknown field(s) colour"),
    "format_unknown": (_set("format", "mtlora-train/9"), "unknown format"),
}


@pytest.mark.parametrize("name", sorted(STATE_CASES))
def test_a_damaged_resume_state_is_refused_before_anything_is_written(name, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    edit, words = STATE_CASES[name]
    state_path = run / LAST_DIR / TRAINING_STATE_JSON
    state = json.loads(state_path.read_text())
    edit(state)
    state_path.write_text(json.dumps(state))  # json writes NaN and Infinity as the bare words
    before = _snapshot(run)

    code, output = invoke(mtlora_cli, "train", "--resume", run, "--out", run, "--epochs", "3", "--quiet")
    assert "Traceback" not in output and code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], output
    assert _snapshot(run) == before, "the run directory changed"
    assert len((run / METRICS_FILE).read_text().splitlines()) == 2
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in finished_run.iterdir())


@pytest.mark.parametrize("line, words", [
    ("not json\n", "line 1 is not a metrics record"),
    ('{"epoch": "one"}\n', "line 1 is not a metrics record"),
    ("[1, 2]\n", "line 1 is not a metrics record"),
])
def test_a_damaged_metrics_log_is_refused_not_rewritten(line, words, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    log = run / METRICS_FILE
    log.write_text(line + log.read_text())
    before = _snapshot(run)
    code, output = invoke(mtlora_cli, "train", "--resume", run, "--out", run, "--epochs", "3", "--quiet")
    assert code == 1 and words in output and len(output.strip().splitlines()) == 1, output
    assert _snapshot(run) == before


def test_out_holding_another_run_is_refused_unless_forced(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    other_model = ["--shared-rank", "4", "--epochs", "2", "--eval-every", "1", "--save-every", "1"]
    for extra, words in [(other_model, "adapter.shared_rank"), (["--epochs", "3", "--lr", "0.003"], "epochs: 2 there, 3 here")]:
        code, output = invoke(mtlora_cli, "train", *TINY_FLAGS, "--data", "synthetic", "--out", run, *extra)
        assert code == 1 and "Traceback" not in output, output
        line = output.strip().splitlines()[-1]
        assert line.startswith("Error: ") and "holds another run" in line and words in line, output
        assert "--force" in line
        assert _snapshot(run) == before

    code, output = invoke(mtlora_cli, "train", *TINY_FLAGS, "--data", "synthetic", "--out", run, *other_model,
                          "--force")
    assert code == 0, output
    assert json.loads((run / "config.json").read_text())["adapter"]["shared_rank"] == [4, 4, 4, 4]


def test_resuming_the_run_in_out_still_works(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, output = invoke(mtlora_cli, "train", "--resume", run, "--out", run, "--epochs", "3", "--quiet")
    assert code == 0, output
    records = [json.loads(x) for x in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_out_holding_files_that_are_not_a_run_is_refused_even_with_force(tmp_path):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for force in ([], ["--force"]):
        code, output = invoke(mtlora_cli, "train", *TINY_FLAGS, "--data", "synthetic", "--epochs", "1", "--out", out,
                              *force)
        assert code == 1 and "not a training run's (thesis.tex)" in output, output
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_fp16_on_a_cpu_is_one_line(tmp_path):
    code, output = invoke(mtlora_cli, "train", *TINY_FLAGS, "--data", "synthetic", "--epochs", "1", "--device", "cpu",
                          "--precision", "fp16", "--out", tmp_path / "out")
    assert code == 1 and output.strip().splitlines() == [
        "Error: --precision fp16 trains on a CUDA GPU only (autocast with a gradient scaler); use bf16 or fp32 on a CPU"
    ], output
    assert not (tmp_path / "out").exists()


def test_the_metrics_log_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import os

    from mtlora.errors import CheckpointError
    from mtlora.train import MetricsLog

    log = MetricsLog(tmp_path / METRICS_FILE, [{"epoch": 1, "train/loss": 1.0}])
    log.write()
    before = (tmp_path / METRICS_FILE).read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        log.append({"epoch": 2, "train/loss": 0.5})
    assert (tmp_path / METRICS_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]  # no temp file left


def test_the_gradient_scaler_state_is_saved_and_validated_on_resume(tmp_path):
    import torch

    from mtlora.model import MultiTaskSwin
    from mtlora.train import build_optimizer, read_resume_point, save_training_checkpoint

    model = MultiTaskSwin(tiny_model_config())
    optimizer, names = build_optimizer(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    state = {"epoch": 1, "step": 4, "train_config": tiny_train_config().to_dict()}
    save_training_checkpoint(model, tmp_path / "last", {"epoch": 1}, optimizer, names, state, scaler)
    point = read_resume_point(tmp_path / "last")
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(point.state["scaler"])
    assert restored.get_scale() == 512.0 and restored.state_dict() == scaler.state_dict()
