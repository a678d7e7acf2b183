"""The trainer: it learns, it resumes exactly, it writes checkpoints atomically, its CLI refuses bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from mtlora.checkpoint import load_checkpoint, save_checkpoint
from mtlora.cli import main
from mtlora.cli.options import model_config_from_options
from mtlora.data.synthetic import SYNTHETIC_TASKS
from mtlora.errors import CheckpointError
from mtlora.train import (
    LAST_DIR,
    TRAINING_STATE_JSON,
    TRAINING_STATE_TENSORS,
    TrainConfig,
    Trainer,
    WarmupCosine,
    build_optimizer,
    read_resume_point,
    save_training_checkpoint,
    train,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Two threads on two shared cores collapse when other processes compete (OpenMP spin-waits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TASKS = ("semseg", "human_parts", "sal", "normals")
# swin_micro at 32x32 with narrow decoders: a few seconds per epoch on two CPU cores.
TINY = dict(preset="default", img_size=32, decoder_channels=(8, 16, 32, 64))


def tiny_model_config(**overrides):
    return model_config_from_options(**{**TINY, **overrides})


def tiny_train_config(**overrides) -> TrainConfig:
    values = dict(data="synthetic", epochs=2, warmup_epochs=0.5, batch_size=8, lr=3e-3, train_samples=32,
                  val_samples=16, eval_every=1, save_every=1, workers=0, threads=1, seed=0)
    return TrainConfig(**{**values, **overrides})


def test_training_beats_the_untrained_model_on_every_task(tmp_path):
    config = tiny_train_config(epochs=3, batch_size=16, train_samples=320, val_samples=48, eval_every=0,
                               eval_initial=True, slim=True)
    result = train(tiny_model_config(), config, tmp_path / "run", progress=False)

    state = json.loads((tmp_path / "run" / "state.json").read_text())
    untrained = {t: v["value"] for t, v in state["initial_metrics"]["primary"].items()}
    trained = {t: v["value"] for t, v in result.metrics["primary"].items()}
    # Measured (seed 0): untrained semseg 8.4 / parts 14.9 / sal 11.4 mIoU, normals 68.2 deg;
    # after 60 steps 57.6 / 35.8 / 43.8 mIoU, 21.7 deg.
    assert trained["semseg"] > untrained["semseg"] + 25
    assert trained["human_parts"] > untrained["human_parts"] + 10
    assert trained["sal"] > untrained["sal"] + 15
    assert trained["normals"] < untrained["normals"] - 25
    assert trained["normals"] < 30  # degrees of mean angular error
    # The slim run directory is exactly a loadable model and its logs.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "curves.png", "metrics.jsonl", "model.safetensors", "state.json"]
    model = load_checkpoint(tmp_path / "run")
    assert model.config.task_channels == {t: SYNTHETIC_TASKS[t] for t in TASKS}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["train/loss"] < records[1]["train/loss"]


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, monkeypatch):
    model_config, config = tiny_model_config(), tiny_train_config(epochs=2)
    train(model_config, config, tmp_path / "straight", progress=False)

    real_train_epoch = Trainer.train_epoch

    def crash_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(model_config, config, tmp_path / "broken", progress=False)
    monkeypatch.setattr(Trainer, "train_epoch", real_train_epoch)
    assert not (tmp_path / "broken" / "model.safetensors").exists()  # only last/ and best/ of epoch 1
    result = train(None, config, tmp_path / "broken", resume=tmp_path / "broken", progress=False)

    assert result.epochs == 2
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "broken")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    a = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in b] == [1, 2]
    assert b[-1]["train/loss"] == pytest.approx(a[-1]["train/loss"], rel=1e-5)

    last = tmp_path / "broken" / LAST_DIR
    point = read_resume_point(tmp_path / "broken")  # a run directory resolves to its last/
    assert point.path == last and point.epoch == 2 and point.state["step"] == 8
    # Optimizer state is safetensors + JSON, no pickle: every trainable tensor has its Adam moments.
    tensors = load_file(str(last / TRAINING_STATE_TENSORS))
    meta = json.loads((last / TRAINING_STATE_JSON).read_text())["optimizer"]
    assert {k.split("/")[-1] for k in tensors} == {"exp_avg", "exp_avg_sq", "step"}
    assert {k.split("/")[1] for k in tensors} <= set(meta["names"])
    assert (tmp_path / "broken" / "best" / "model.safetensors").is_file()


def test_resume_refuses_a_different_model_and_a_finished_run(tmp_path):
    train(tiny_model_config(), tiny_train_config(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="differ from the checkpoint"):
        train(tiny_model_config(shared_rank=(4,)), tiny_train_config(epochs=2), tmp_path / "run2",
              resume=tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="already finished epoch 1"):
        train(None, tiny_train_config(epochs=1), tmp_path / "run2", resume=tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="no training state"):
        train(None, tiny_train_config(epochs=2), tmp_path / "run2", resume=tmp_path / "run" / "best",
              progress=False)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from mtlora.model import MultiTaskSwin

    model = MultiTaskSwin(tiny_model_config())
    optimizer, names = build_optimizer(model, 1e-3, 0.05)
    out = tmp_path / "last"
    save_training_checkpoint(model, out, {"epoch": 1}, optimizer, names, {"epoch": 1, "step": 1, "train_config": {}})
    before = sorted(p.name for p in out.iterdir())

    import mtlora.train.state as training_state  # where save_training_checkpoint looks up save_file

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(training_state, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_training_checkpoint(model, out, {"epoch": 2}, optimizer, names, {"epoch": 2, "step": 2, "train_config": {}})
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "state.json").read_text())["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last"]  # no staging directories left behind


def test_warmup_cosine_schedule_matches_the_official_shape():
    schedule = WarmupCosine(peak_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(5) == pytest.approx(1e-6 + 5 * (1e-3 - 1e-6) / 10)
    assert schedule(10) == pytest.approx(1e-3)
    assert schedule(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert schedule(110) == pytest.approx(1e-5)
    assert all(schedule(s) >= schedule(s + 1) for s in range(10, 110))


def test_weight_decay_skips_biases_and_norms():
    from mtlora.model import MultiTaskSwin

    model = MultiTaskSwin(tiny_model_config())
    optimizer, names = build_optimizer(model, 1e-3, 0.05)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = names[: len(decay["params"])]
    assert all(p.ndim > 1 for p in decay["params"])
    assert not any(n.endswith(".bias") for n in decayed)  # position tables decay, as upstream: test_train_parity
    assert any("lora_A" in n for n in decayed)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- the command line


def _pascal_tree(root, ids=("a", "b"), tasks=("semseg", "sal"), corrupt=()):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Context").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    rng = np.random.default_rng(0)
    if "semseg" in tasks:
        (root / "semseg" / "VOC12").mkdir(parents=True)
    if "sal" in tasks:
        (root / "sal_distill").mkdir()
    for i in ids:
        if i in corrupt:
            (root / "JPEGImages" / f"{i}.jpg").write_bytes(b"not a jpeg at all")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        if "semseg" in tasks:
            Image.fromarray(rng.integers(0, 21, (40, 48), dtype=np.uint8), mode="L").save(
                root / "semseg" / "VOC12" / f"{i}.png")
        if "sal" in tasks:
            Image.fromarray(rng.integers(0, 2, (40, 48), dtype=np.uint8) * 255, mode="L").save(
                root / "sal_distill" / f"{i}.png")
    return root


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


TINY_FLAGS = ["--preset", "default", "--img-size", "32", "--decoder-channels", "8,16,32,64", "--epochs", "1",
              "--batch-size", "2", "--workers", "0", "--threads", "1", "--quiet"]


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda root: root.mkdir(), ["--tasks", "semseg"], "is not a PASCAL_MT tree"),
        (lambda root: _pascal_tree(root), ["--tasks", "semseg,normals"], "no labels for task(s) normals"),
        (lambda root: _pascal_tree(root, ids=()), ["--tasks", "semseg"], "split is empty"),
        (lambda root: _pascal_tree(root, corrupt=("a",)), ["--tasks", "semseg,sal"], "not an image"),
        # Found by a loader worker mid-epoch: still one line, not the worker's traceback.
        (lambda root: _pascal_tree(root, corrupt=("b",)), ["--tasks", "sal", "--workers", "1"], "not an image"),
    ],
    ids=["not-a-data-set", "missing-task", "empty-split", "unreadable-image", "unreadable-image-in-worker"],
)
def test_train_cli_turns_bad_data_into_one_line(tmp_path, setup, args, message):
    root = tmp_path / "pascal"
    setup(root)
    code, output = _run(["train", *TINY_FLAGS, "--data", "pascal", "--data-root", str(root),
                         "--out", str(tmp_path / "out"), *args])
    assert code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], output
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data-root", "."], "takes no data root"),
        (["--lr", "0"], "--lr"),
        (["--tasks", "semseg,semseg"], "listed twice"),
        (["--shared-rank", "four"], "is not an integer rank"),
        (["--pretrained", "pyproject.toml", "--resume", "."], None),
    ],
)
def test_train_cli_refuses_bad_flags_with_a_usage_error(tmp_path, args, message):
    code, output = _run(["train", *TINY_FLAGS, "--data", "synthetic", "--out", str(tmp_path / "out"), *args])
    assert code == 2, output
    if message:
        assert message in output


def test_train_cli_end_to_end_then_evaluate(tmp_path):
    out = tmp_path / "run"
    code, output = _run(["train", *TINY_FLAGS, "--data", "synthetic", "--train-samples", "8", "--val-samples", "4",
                         "--out", str(out), "--no-slim"])
    assert code == 0, output
    assert "trained 1 epochs" in output
    assert {"best", "last", "metrics.jsonl", "curves.png", "model.safetensors"} <= {p.name for p in out.iterdir()}

    report = tmp_path / "eval.json"
    code, output = _run(["evaluate", str(out), "--data", "synthetic", "--samples", "4", "--json", str(report)])
    assert code == 0, output
    assert "semseg" in output and "mIoU*" in output
    results = json.loads(report.read_text())
    assert results["num_samples"] == 4 and results["delta_m"] is None
    assert set(results["tasks"]) == set(TASKS)

    # A model-only checkpoint cannot be resumed; the message says what can.
    code, output = _run(["train", "--data", "synthetic", "--out", str(tmp_path / "again"), "--resume", str(out / "best")])
    assert code == 1 and "no training state" in output


def test_segformer_updecoder_and_aspp_heads_train(tmp_path):
    out = tmp_path / "run"
    heads = "semseg=segformer,human_parts=updecoder,sal=aspp"  # normals keeps the HRNet head
    code, output = _run(["train", *TINY_FLAGS, "--epochs", "3", "--batch-size", "8", "--train-samples", "16",
                         "--val-samples", "4", "--eval-every", "0", "--lr", "3e-3", "--decoder-heads", heads,
                         "--segformer-channels", "16", "--data", "synthetic", "--slim", "--out", str(out)])
    assert code == 0, output
    model = load_checkpoint(out)
    assert model.config.decoder_heads == {"semseg": "segformer", "human_parts": "updecoder", "sal": "aspp"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["epoch"]: r for r in records if "train/loss" in r}
    # Six optimisation steps (measured, seed 0): semseg 1.57 -> 1.38, human_parts 1.43 -> 1.33, sal 0.168 -> 0.133.
    for task in ("semseg", "human_parts", "sal"):
        assert losses[3][f"train/loss/{task}"] < losses[1][f"train/loss/{task}"], task
    assert losses[3]["train/loss"] < losses[1]["train/loss"]


def test_evaluate_cli_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    code, output = _run(["evaluate", str(tmp_path), "--data", "synthetic"])
    assert code == 1 and output.startswith("Error: ") and "not an mtlora checkpoint" in output


def test_evaluate_cli_refuses_heads_that_do_not_fit_the_data(tmp_path):
    from mtlora.model import MultiTaskSwin

    model = MultiTaskSwin(tiny_model_config())  # semseg head with PASCAL's 21 classes
    save_checkpoint(model, tmp_path / "ckpt")
    code, output = _run(["evaluate", str(tmp_path / "ckpt"), "--data", "synthetic", "--samples", "2"])
    assert code == 1 and f"semseg has 21 outputs, synthetic has {SYNTHETIC_TASKS['semseg']} classes" in output


def test_pretrained_backbone_is_loaded_and_stays_frozen(tmp_path):
    pretrained = pytest.importorskip("mtlora.pretrained")
    from safetensors.torch import save_file

    from mtlora.model import build_swin

    model_config = tiny_model_config()
    torch.manual_seed(1)
    source = build_swin(model_config)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    assert hasattr(pretrained, "load_pretrained_backbone")

    train(model_config, tiny_train_config(epochs=1, pretrained=str(tmp_path / "swin.safetensors"), slim=True),
          tmp_path / "run", progress=False)
    weights = _weights(tmp_path / "run")
    frozen = "backbone.layers.1.blocks.0.attn.qkv.base.weight"  # MTLoRA freezes the pretrained qkv
    assert torch.equal(weights[frozen], source.state_dict()["layers.1.blocks.0.attn.qkv.weight"])
    trained = "backbone.patch_embed.proj.weight"  # ... and trains the patch embedding
    assert not torch.equal(weights[trained], source.state_dict()["patch_embed.proj.weight"])
