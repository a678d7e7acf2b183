"""The training loop against the official MTLoRA code: the schedule at every optimiser step and the weight-decay
groups (recorded from the official code, tests/fixtures/official/training/), gradient accumulation, and the
fp16 gradient scaler's step logic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtlora.cli.options import model_config_from_options
from mtlora.model import MultiTaskSwin
from mtlora.train import (
    OptimizerStep,
    TrainConfig,
    WarmupCosine,
    build_optimizer,
    peak_learning_rate,
    resolve_precision,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official" / "training"


@pytest.mark.parametrize("case", json.loads((FIXTURES / "schedules.json").read_text()),
                         ids=lambda c: f"{c['epochs']}ep-{c['warmup_epochs']}wu-{c['batches_per_epoch']}b-x{c['accumulation_steps']}")
def test_every_step_uses_the_rate_the_official_loop_uses(case):
    steps_per_epoch = case["batches_per_epoch"] // case["accumulation_steps"]
    schedule = WarmupCosine.official(case["base_lr"], case["warmup_lr"], case["min_lr"], case["warmup_epochs"],
                                     case["epochs"], steps_per_epoch)
    official = case["rates"]
    assert len(official) == case["epochs"] * steps_per_epoch
    # Our trainer's bookkeeping: the rate of the position the previous step set, the warm-up start at first.
    ours, last = [], None
    batches, steps = case["batches_per_epoch"], case["accumulation_steps"]
    for epoch in range(case["epochs"]):
        for batch in range(steps_per_epoch * steps):
            if (batch + 1) % steps == 0:
                ours.append(schedule.rate(0 if last is None else last))
                last = WarmupCosine.update_index(epoch, batch, batches, steps)
    if batches % steps == 0:  # then the position is simply the count of steps taken
        assert ours == [schedule.applied(step) for step in range(len(official))]
    for step, (a, b) in enumerate(zip(ours, official, strict=True)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-18), f"step {step}"
    # Unshifted, the schedule runs one step ahead: the first warm-up steps differ many times over.
    if schedule.warmup_steps > 1:
        assert schedule.rate(1) > 2 * official[1]


def test_a_resumed_run_continues_the_same_sequence():
    schedule = WarmupCosine.official(1e-3, 1e-6, 1e-5, 1.5, 4, 10)
    straight = [schedule.applied(s) for s in range(40)]
    # After a resume, the trainer starts from its saved step count.
    resumed = straight[:20] + [schedule.applied(20 + s) for s in range(20)]
    assert resumed == straight


def test_weight_decay_groups_are_the_official_ones():
    recorded = json.loads((FIXTURES / "param_groups.json").read_text())["groups"]
    model = MultiTaskSwin(model_config_from_options(preset="default", img_size=32, decoder_channels=(8, 16, 32, 64)))
    optimizer, names = build_optimizer(model, 5e-4, 0.05)
    decay, no_decay = optimizer.param_groups
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    official = {g["weight_decay"]: [n for n in g["names"] if n in trainable] for g in recorded}
    assert names[: len(decay["params"])] == official[0.05]
    assert names[len(decay["params"]):] == official[0.0]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # The official wrapper hides Swin's no_weight_decay(), so the position-bias tables decay there and here.
    assert any("relative_position_bias_table" in n for n in official[0.05])


def test_the_learning_rate_scales_with_the_accumulation_steps_as_upstream():
    config = TrainConfig(batch_size=8, accumulation_steps=4)
    assert peak_learning_rate(config, world_size=2) == pytest.approx(5e-4 * 8 * 2 * 4 / 512)
    assert peak_learning_rate(TrainConfig(batch_size=8, accumulation_steps=4, lr=1e-3), 2) == 1e-3


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))


def _batch(seed=1, n=12):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randn(n, 3, generator=generator)


@pytest.mark.parametrize("clip", [0.0, 5.0])
def test_n_micro_batches_make_the_update_of_one_batch_n_times_as_large(clip):
    x, y = _batch()
    big, small = _tiny_net(), _tiny_net()
    big_opt, small_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (big, small))
    big_step = OptimizerStep(big_opt, list(big.parameters()), clip, accumulation_steps=1)
    small_step = OptimizerStep(small_opt, list(small.parameters()), clip, accumulation_steps=3)

    # One batch of 12; its per-sample mean loss, times 3 (upstream sums the micro-batch losses, undivided).
    loss = torch.nn.functional.mse_loss(big(x), y) * 3
    loss.backward()
    expected_grads = [p.grad.clone() for p in big.parameters()]
    big_opt.zero_grad()
    big_norm = big_step.backward(torch.nn.functional.mse_loss(big(x), y) * 3)

    norms = []
    for i in range(3):
        part = slice(4 * i, 4 * i + 4)
        closes = small_step.closes_step
        norms.append(small_step.backward(torch.nn.functional.mse_loss(small(x[part]), y[part])))
        assert closes == (i == 2)
        if i == 1:  # the sum so far is still in .grad: nothing stepped yet
            assert all(p.grad is not None for p in small.parameters())
    assert norms[:2] == [None, None] and norms[2] == pytest.approx(big_norm, rel=1e-5)
    assert big_norm == pytest.approx(float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g) for g in expected_grads]))), rel=1e-5)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in small.parameters())  # zeroed after the step


def test_the_scaler_clips_unscaled_gradients_skips_inf_steps_and_round_trips():
    x, y = _batch()
    plain, scaled = _tiny_net(), _tiny_net()
    plain_opt, scaled_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, scaled))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plain_step = OptimizerStep(plain_opt, list(plain.parameters()), 0.5)
    scaled_step = OptimizerStep(scaled_opt, list(scaled.parameters()), 0.5, scaler=scaler)

    a = plain_step.backward(torch.nn.functional.mse_loss(plain(x), y))
    b = scaled_step.backward(torch.nn.functional.mse_loss(scaled(x), y))
    assert b == pytest.approx(a, rel=1e-5)  # the norm of the unscaled gradients, not 1024 times it
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)

    before = [p.detach().clone() for p in scaled.parameters()]
    assert scaled_step.backward(torch.nn.functional.mse_loss(scaled(x), y) * float("inf")) is not None
    assert scaled_step.skipped == 1 and scaler.get_scale() == 2.0**9
    for p, q in zip(before, scaled.parameters(), strict=True):
        assert torch.equal(p, q)  # the step with inf gradients changed nothing

    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(json.loads(json.dumps(scaler.state_dict())))  # as training_state.json holds it
    assert restored.state_dict() == scaler.state_dict()


def test_fp16_needs_a_gpu_and_auto_means_fp32_on_a_cpu():
    from mtlora.errors import ConfigError

    with pytest.raises(ConfigError, match="--precision fp16 trains on a CUDA GPU only"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")).grad_scaler(torch.device("cpu")) is None
    mode = resolve_precision("fp32", torch.device("cpu"))
    assert mode.dtype is None and not mode.scaled and not math.isnan(0.0)


def test_the_trainer_steps_once_per_accumulation_and_with_the_official_rates(tmp_path):
    from mtlora.train import Distributed, Trainer
    from tests.test_train import tiny_model_config, tiny_train_config

    torch.set_num_threads(1)
    # 40 samples of batch 8: 5 batches an epoch, 2 steps of 2 (the fifth is dropped, as upstream drops it).
    config = tiny_train_config(epochs=3, warmup_epochs=1.5, train_samples=40, val_samples=8, accumulation_steps=2,
                               eval_every=0, save_every=0, lr=None)
    trainer = Trainer(tiny_model_config(), config, tmp_path / "run", None, False, Distributed())
    used = []
    real_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return real_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    result = trainer.run()
    assert result.steps == 6 and len(used) == 6
    assert trainer.peak_lr == pytest.approx(5e-4 * 8 * 2 / 512)
    schedule = trainer.schedule
    assert (schedule.warmup_steps, schedule.total_steps) == (3, 6)
    # Upstream's positions: (epoch * 5 + batch) // 2 after the steps closing batches 1 and 3 of each
    # epoch: 0, 1 | 3, 4 | 5, 6; each step runs with the position the step before it set.
    positions = [None, 0, 1, 3, 4, 5]
    assert used == pytest.approx([schedule.rate(0 if p is None else p) for p in positions], rel=1e-12)
