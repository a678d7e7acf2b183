"""The training loop: `train()` runs a `Trainer`, which checks everything before its first write, then
trains epoch by epoch, validates, keeps the best and last checkpoints, and assembles the run directory."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from mtlora.checkpoint import load_into
from mtlora.config import ModelConfig
from mtlora.data.datasets import collate
from mtlora.errors import ConfigError, DataError, MTLoRAError
from mtlora.evaluate import default_baselines, evaluate, json_ready, worker_error, worker_settings
from mtlora.losses import MultiTaskLoss
from mtlora.model import MultiTaskSwin
from mtlora.train.config import TrainConfig
from mtlora.train.distributed import (
    Distributed,
    average_buffers,
    default_threads,
    default_workers,
    seed_everything,
    setup_distributed,
    unused_parameters,
)
from mtlora.train.inputs import build_datasets, resolve_model_config
from mtlora.train.logs import MetricsLog, Progress, flat_metrics, plot_curves, progress_enabled, summary_line
from mtlora.train.optimizer import OptimizerStep, build_optimizer
from mtlora.train.precision import resolve_precision
from mtlora.train.run_directory import (
    BEST_DIR,
    CURVES_FILE,
    LAST_DIR,
    METRICS_FILE,
    check_output_directory,
    finish_run_directory,
    restored_on_failure,
)
from mtlora.train.schedule import WarmupCosine, peak_learning_rate
from mtlora.train.state import ResumePoint, load_optimizer_state, read_resume_point, save_training_checkpoint

log = logging.getLogger("mtlora.train")


@dataclass
class TrainResult:
    out: Path
    epochs: int
    steps: int
    seconds: float
    metrics: dict[str, Any] | None
    best: dict[str, Any] | None


def train(
    model_config: ModelConfig | None,
    config: TrainConfig,
    out: str | Path,
    resume: str | Path | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> TrainResult:
    """Train a multi-task model and write the run directory `out` (see `mtlora.train.run_directory`).

    With `resume`, the model comes from that checkpoint (`model_config`, if
    given, must describe the same model) and training continues after its
    last completed epoch; `config.epochs` may be raised to train longer.
    An `out` that holds another run (another model or settings) is refused
    unless `force` (see `check_output_directory`).
    `progress`: None = a bar on a terminal and log lines otherwise, False = quiet.
    """
    ctx = setup_distributed(config.device)
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(model_config, config, Path(out), resume, progress, ctx, force)
        with restored_on_failure(trainer.out) if ctx.is_main else contextlib.nullcontext():
            return trainer.run()
    finally:
        torch.set_num_threads(threads)
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One training run; `train()` is the way to use it."""

    def __init__(self, model_config: ModelConfig | None, config: TrainConfig, out: Path, resume,
                 progress: bool | None, ctx: Distributed, force: bool = False):
        self.started = time.perf_counter()
        self.config, self.out, self.ctx = config, out, ctx
        self.show = progress is not False and ctx.is_main
        self.bar = progress is not False and progress_enabled()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")

        # Everything is checked before the first write to `out` (the metrics log, at the end of __init__).
        self.precision = resolve_precision(config.precision, ctx.device)
        resume_point = read_resume_point(resume) if resume is not None else None
        self.model_config = resolve_model_config(model_config, config, resume_point)
        check_output_directory(out, self.model_config, config, resume_point, force)
        self.tasks = tuple(self.model_config.tasks)
        self.train_set, self.val_set = build_datasets(config, self.model_config)

        seed_everything(config.seed)  # the same initial weights on every rank
        self.model = MultiTaskSwin(self.model_config)
        if resume_point is not None:
            load_into(self.model, resume_point.weights, str(resume_point.path))
        elif config.pretrained:
            from mtlora.pretrained import load_pretrained_backbone

            left = load_pretrained_backbone(self.model, config.pretrained)
            self.info("loaded pretrained backbone %s (%d adapter tensors start from init)", config.pretrained,
                      len(left))
        self.model.to(ctx.device)

        self.peak_lr = peak_learning_rate(config, ctx.world_size)
        self.optimizer, self.names = build_optimizer(self.model, self.peak_lr, config.weight_decay)
        self.scaler = self.precision.grad_scaler(ctx.device)
        self.epoch, self.step, self.best, self.seconds_before = 0, 0, None, 0.0
        if resume_point is not None:
            load_optimizer_state(self.optimizer, self.names, resume_point.optimizer_tensors,
                                 resume_point.state["optimizer"], str(resume_point.path))
            self.epoch, self.step = resume_point.epoch, int(resume_point.state["step"])
            self.best = resume_point.state.get("best")
            self.seconds_before = float(resume_point.state.get("seconds", 0.0))
            if self.scaler is not None and "scaler" in resume_point.state:
                self.scaler.load_state_dict(resume_point.state["scaler"])
            if self.epoch >= config.epochs:
                raise ConfigError(f"the checkpoint already finished epoch {self.epoch} of {config.epochs}; "
                                  "pass a larger --epochs to train longer")
        self.resumed = resume_point is not None

        self.sampler = DistributedSampler(self.train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                          shuffle=True, seed=config.seed, drop_last=True)
        self.workers = default_workers() if config.workers is None else config.workers
        if ctx.device.type == "cpu":
            torch.set_num_threads(config.threads or default_threads(self.workers))
        self.loader = DataLoader(self.train_set, batch_size=config.batch_size, sampler=self.sampler,
                                 num_workers=self.workers, collate_fn=collate, drop_last=True,
                                 pin_memory=ctx.device.type == "cuda", **worker_settings(self.workers, persistent=True))
        if len(self.loader) == 0:
            raise DataError(
                f"the training split has {len(self.train_set)} samples, {len(self.sampler)} per process: fewer "
                f"than one batch of {config.batch_size}; lower --batch-size or add samples"
            )
        available = min(len(self.loader), config.steps_per_epoch or len(self.loader))
        # Whole optimiser steps only: main.py zeroes the gradients at each epoch's start, dropping a remainder.
        self.steps_per_epoch = available // config.accumulation_steps
        if self.steps_per_epoch == 0:
            raise DataError(f"an epoch has {available} batch(es), fewer than --accumulation-steps "
                            f"{config.accumulation_steps}; lower it or add samples")
        self.batches_per_epoch = self.steps_per_epoch * config.accumulation_steps
        self.available_batches = available
        # The schedule position upstream's last step_update set (None: the warm-up start, before any step).
        self.last_update = self.update_index(self.epoch, self.batches_per_epoch - 1) if self.epoch else None
        self.schedule = WarmupCosine.official(
            self.peak_lr, self.peak_lr * config.warmup_lr_ratio, self.peak_lr * config.min_lr_ratio,
            config.warmup_epochs, config.epochs, self.steps_per_epoch,
        )
        self.criterion = MultiTaskLoss(self.tasks, config.loss_weights or None)
        self.stepper = OptimizerStep(self.optimizer, [p for p in self.model.parameters() if p.requires_grad],
                                     config.clip_grad, config.accumulation_steps, self.scaler)
        baselines = config.baselines if config.baselines is not None else default_baselines(config.data)
        # Delta_m is defined over all tasks; without a baseline for every one it is not reported.
        self.baselines = baselines if baselines is not None and set(self.tasks) <= set(baselines) else None

        self.net = self.model
        if ctx.enabled:
            self.net = DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=bool(unused_parameters(self.model)),
            )
        # Opened by `run`, inside `restored_on_failure`: the log is the first write to `out`.
        self.resume_point = resume_point
        self.metrics_log: MetricsLog | None = None
        self.last_results: dict | None = None
        self.initial_results: dict | None = None

    def info(self, message: str, *args) -> None:
        if self.show:
            log.info(message, *args)

    def _open_metrics_log(self, resume_point: ResumePoint | None) -> MetricsLog:
        self.out.mkdir(parents=True, exist_ok=True)
        previous = []
        if resume_point is not None:
            here = self.out / METRICS_FILE
            source = here if here.is_file() else resume_point.path.parent / METRICS_FILE
            previous = MetricsLog.read(source, up_to_epoch=self.epoch)
        metrics_log = MetricsLog(self.out / METRICS_FILE, previous)
        metrics_log.write()
        return metrics_log

    def autocast(self):
        return self.precision.autocast(self.ctx.device)

    def sync_gradients(self):
        """DDP all-reduces gradients only on the micro-batch that closes an optimiser step."""
        if self.ctx.enabled and not self.stepper.closes_step:
            return self.net.no_sync()
        return contextlib.nullcontext()

    def run(self) -> TrainResult:
        config = self.config
        if self.ctx.is_main:
            self.metrics_log = self._open_metrics_log(self.resume_point)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.info(
            "training %s (%s, %s) on %s: %d train / %d val samples, %d epochs x %d steps of batch %d x %d "
            "process(es)%s, peak lr %.3g, %s, %d trainable parameters, %d loader worker(s), %s%s",
            ", ".join(self.tasks), self.model_config.adapter.kind, _variant_text(self.model_config), config.data,
            len(self.train_set), len(self.val_set), config.epochs, self.steps_per_epoch, config.batch_size,
            self.ctx.world_size,
            f" x {config.accumulation_steps} accumulated" if config.accumulation_steps > 1 else "", self.peak_lr, self.precision_text(), trainable, self.workers,
            f"{torch.get_num_threads()} CPU thread(s)" if self.ctx.device.type == "cpu" else str(self.ctx.device),
            f", resuming after epoch {self.epoch}" if self.resumed else "",
        )
        if config.eval_initial and not self.resumed:
            self.initial_results = self.validate()
            if self.ctx.is_main:
                self.metrics_log.append({"epoch": 0, "step": 0, **flat_metrics(self.initial_results)})
                self.info("epoch 0 (initial): %s", summary_line(self.initial_results))
        for epoch in range(self.epoch + 1, config.epochs + 1):
            self.epoch = epoch
            record = self.train_epoch(epoch)
            final = epoch == config.epochs
            results = None
            if final or (config.eval_every and epoch % config.eval_every == 0):
                results = self.validate()
            if self.ctx.is_main:
                self.end_epoch(record, results, save=final or bool(config.save_every and epoch % config.save_every == 0))
            self.ctx.barrier()
        seconds = self.elapsed()
        if self.ctx.is_main:
            self.finish(seconds)
        self.ctx.barrier()
        return TrainResult(self.out, self.epoch, self.step, seconds, self.last_results, self.best)

    def update_index(self, epoch: int, batch: int) -> int:
        return WarmupCosine.update_index(epoch - 1, batch, self.available_batches, self.config.accumulation_steps)

    def current_rate(self) -> float:
        return self.schedule.rate(0 if self.last_update is None else self.last_update)

    def precision_text(self) -> str:
        if self.scaler is None:
            return self.precision.name
        return f"{self.precision.name} with a gradient scaler (scale {self.scaler.get_scale():g})"

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over (at most `steps_per_epoch` batches of) the training split; returns its log record."""
        ctx, tasks = self.ctx, self.tasks
        seed_everything(self.config.seed, ctx.rank, epoch)
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        self.model.train()
        started = time.perf_counter()
        sums = torch.zeros(len(tasks) + 1, dtype=torch.float64, device=ctx.device)
        bar = Progress(self.steps_per_epoch, f"epoch {epoch}/{self.config.epochs}", self.show, self.bar)
        batches = iter(self.loader)
        self.stepper.reset()
        lr, done = self.current_rate(), 0
        skipped = self.stepper.skipped
        try:
            for i in range(self.batches_per_epoch):
                try:
                    batch = next(batches)
                except MTLoRAError as err:
                    raise type(err)(worker_error(err)) from None
                lr = self.current_rate()
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                image = batch["image"].to(ctx.device, non_blocking=True)
                targets = {t: batch[t].to(ctx.device, non_blocking=True) for t in tasks}
                with self.sync_gradients():
                    with self.autocast():
                        outputs = self.net(image)
                    loss, per_task = self.criterion({t: o.float() for t, o in zip(tasks, outputs, strict=True)},
                                                    targets)
                    if not torch.isfinite(loss):
                        raise MTLoRAError(f"the loss became {loss.item()} at epoch {epoch}, batch {i + 1}: training "
                                          "diverged (lower --lr, or check the labels)")
                    grad_norm = self.stepper.backward(loss)
                values = torch.stack([loss.detach()] + [per_task[t].detach() for t in tasks]).double()
                sums += values
                if grad_norm is not None:
                    self.last_update = self.update_index(epoch, i)
                    self.step, done = self.step + 1, done + 1
                    bar.update(done, loss=float(values[0]), lr=lr, grad=grad_norm)
        finally:
            bar.close()
            del batches
        if ctx.enabled:
            dist.all_reduce(sums)
            sums /= ctx.world_size
            average_buffers(self.model)
        means = (sums / self.batches_per_epoch).tolist()
        record = {
            "epoch": epoch, "step": self.step, "lr": lr,
            "time/train_s": round(time.perf_counter() - started, 3), "train/loss": means[0],
            **{f"train/loss/{t}": v for t, v in zip(tasks, means[1:], strict=True)},
        }
        if self.scaler is not None:
            record["train/loss_scale"] = self.scaler.get_scale()
            record["train/skipped_steps"] = self.stepper.skipped - skipped
        return record

    def validate(self) -> dict | None:
        """Rank 0 evaluates the unwrapped model on the validation split; the others wait."""
        results = None
        if self.ctx.is_main:
            results = evaluate(
                self.model, self.val_set, self.tasks, batch_size=self.config.batch_size, device=self.ctx.device,
                workers=self.workers, baselines=self.baselines, criterion=self.criterion,
                precision=self.precision.validation, progress=self.show and self.bar,
            )
            self.model.train()
        self.ctx.barrier()
        return results

    def end_epoch(self, record: dict, results: dict | None, save: bool) -> None:
        """Rank 0: log the epoch, track the best model, redraw the curves, write `last/` when due."""
        config, epoch = self.config, self.epoch
        if results is not None:
            self.last_results = results
            record.update(flat_metrics(results))
            name, value, higher = _selection(results)
            if _better(value, self.best["value"] if self.best else None, higher):
                self.best = {"epoch": epoch, "criterion": name, "value": value}
                if not config.slim:
                    save_training_checkpoint(self.model, self.out / BEST_DIR, self.model_state(results))
        self.metrics_log.append(record)
        self.info("epoch %d/%d: loss %.4f (%.1fs)%s", epoch, config.epochs, record["train/loss"],
                  record["time/train_s"], f" | {summary_line(results)}" if results is not None else "")
        if results is not None:
            plot_curves(self.metrics_log.records, self.out / CURVES_FILE)
        if save and not config.slim:
            save_training_checkpoint(
                self.model, self.out / LAST_DIR, self.model_state(results), self.optimizer, self.names,
                {"epoch": epoch, "step": self.step, "seconds": self.elapsed(), "best": self.best,
                 "train_config": config.to_dict(), "world_size": self.ctx.world_size}, self.scaler,
            )

    def model_state(self, results: dict | None) -> dict[str, Any]:
        """What state.json of a checkpoint records about the run."""
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "data": self.config.data,
            "tasks": list(self.tasks),
            "train_config": self.config.to_dict(),
            "best": self.best,
        }
        if results is not None:
            state["metrics"] = json_ready(results)
        return state

    def finish(self, seconds: float) -> None:
        state = self.model_state(self.last_results)
        state["seconds"] = round(seconds, 1)
        if self.initial_results is not None:
            state["initial_metrics"] = json_ready(self.initial_results)
        if self.metrics_log.records and not (self.out / CURVES_FILE).exists():
            plot_curves(self.metrics_log.records, self.out / CURVES_FILE)
        keep = (METRICS_FILE, CURVES_FILE) if self.config.slim else (METRICS_FILE, CURVES_FILE, BEST_DIR, LAST_DIR)
        finish_run_directory(self.model, self.out, state, keep)
        self.info("wrote %s (%d epochs, %.0f s)", self.out, self.epoch, seconds)


def _variant_text(config: ModelConfig) -> str:
    swin = config.swin
    return f"Swin embed {swin.embed_dim} depths {list(swin.depths)} at {swin.img_size}px"


def _selection(results: dict) -> tuple[str, float, bool]:
    """What picks the best model: Delta_m when baselines exist, else the weighted validation loss."""
    if results.get("delta_m") is not None:
        return "delta_m", float(results["delta_m"]), True
    return "val_loss", float(results["loss"]["total"]), False


def _better(value: float, best: float | None, higher: bool) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value > best if higher else value < best)
