"""`mtlora train`: a thin command over `mtlora.train`.

Options default to None so that an explicit flag can be told apart: a flag
the user typed wins, then (when resuming) the run's saved settings, then the
`--preset`, then the official recipe.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from mtlora.cli.options import MODEL_OPTION_NAMES, PRESETS, model_config_from_options, model_options
from mtlora.data.datasets import DATASET_NAMES
from mtlora.errors import ConfigError
from mtlora.train.config import MAX_SAMPLES, MAX_SEED, MAX_THREADS, MAX_WEIGHT_DECAY, MAX_WORKERS

_TRAIN_OPTION_NAMES = (
    "data", "data_root", "epochs", "warmup_epochs", "batch_size", "lr", "weight_decay", "clip_grad",
    "accumulation_steps", "steps_per_epoch", "train_samples", "val_samples", "seed", "workers", "save_every", "eval_every",
    "eval_initial", "precision", "device", "pretrained", "slim", "threads",
)  # fmt: skip


def _setup_logging() -> None:
    logger = logging.getLogger("mtlora")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def resolve_train_config(
    explicit: dict[str, Any], preset: str | None, saved: dict[str, Any] | None = None, baselines=None
):
    """A TrainConfig from explicit flags, then a resumed run's settings, then the preset, then the recipe."""
    from mtlora.train import TrainConfig

    values: dict[str, Any] = {}
    if preset:
        values.update(PRESETS[preset]["train"])
        if explicit.get("data") not in (None, "synthetic"):
            # The preset's scene counts describe its synthetic data; they do not carry over to a real set.
            values.pop("train_samples", None)
            values.pop("val_samples", None)
    if saved:
        known = {f.name for f in fields(TrainConfig)}
        values.update({k: v for k, v in saved.items() if k in known})
    values.update({k: v for k, v in explicit.items() if v is not None})
    if baselines is not None:
        values["baselines"] = baselines
    if "data" not in values:
        raise click.UsageError("Missing option '--data' (synthetic, pascal or nyud), or give a --preset.")
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as err:
        # These are conflicting or invalid flags, a usage error rather than a failure of the run.
        raise click.UsageError(str(err)) from None


@click.command("train")
@model_options
@click.option("--data", type=click.Choice(DATASET_NAMES), default=None,
              help="Data set to train on (required unless --preset or --resume gives it).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Extracted PASCAL-Context / NYUD-v2 folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run directory: final model, metrics.jsonl, curves.png, best/, last/.")
@click.option("--resume", type=click.Path(exists=True), default=None,
              help="Continue a run from its last/ checkpoint (or the run directory holding it).")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False), default=None,
              help="ImageNet Swin weights (timm or Microsoft .pth / .safetensors) for the backbone.")
@click.option("--epochs", type=click.IntRange(1, 10**6), default=None, help="Epochs. [default: 300]")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=None,
              help="Linear warm-up epochs before the cosine decay. [default: 20]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size per process. [default: 32]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate. [default: 5e-4 x global batch / 512, the official linear scaling]")
@click.option("--weight-decay", type=click.FloatRange(0, MAX_WEIGHT_DECAY), default=None, help="AdamW weight decay. [default: 0.05]")
@click.option("--clip-grad", type=click.FloatRange(min=0), default=None,
              help="Gradient norm clipping, 0 = off. [default: 5.0]")
@click.option("--accumulation-steps", type=click.IntRange(min=1), default=None,
              help="Sum the gradients of N batches into one optimiser step (the official TRAIN.ACCUMULATION_STEPS; "
                   "the default learning rate scales with N). [default: 1]")
@click.option("--steps-per-epoch", type=click.IntRange(1, MAX_SAMPLES), default=None,
              help="At most this many batches per epoch. [default: the whole split]")
@click.option("--train-samples", type=click.IntRange(1, MAX_SAMPLES), default=None,
              help="Synthetic data only: training scenes. [default: 2000]")
@click.option("--val-samples", type=click.IntRange(1, MAX_SAMPLES), default=None,
              help="Synthetic data only: validation scenes. [default: 200]")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None, help="Random seed. [default: 0]")
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=None,
              help="Data loader processes. [default: 4, fewer on small machines]")
@click.option("--save-every", type=click.IntRange(min=0), default=None,
              help="Write last/ every N epochs (and always at the end); 0 = only at the end. [default: 20]")
@click.option("--eval-every", type=click.IntRange(min=0), default=None,
              help="Validate every N epochs (and always at the end); 0 = only at the end. [default: 5]")
@click.option("--eval-initial/--no-eval-initial", default=None,
              help="Also validate the model before training (epoch 0 of the curves). [default: no]")
@click.option("--baseline-json", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Single-task baselines for Delta_m: {task: metric} or an 'mtlora evaluate --json' report. "
                   "Repeatable. [default: the paper's for PASCAL, none otherwise]")
@click.option("--precision", type=click.Choice(("auto", "fp32", "bf16", "fp16")), default=None,
              help="auto = bf16 autocast on a CUDA GPU that has it, else fp16 autocast with a gradient scaler "
                   "(the official default); fp32 on CPU. fp16 needs a CUDA GPU. [default: auto]")
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default=None, help="[default: auto]")
@click.option("--slim/--no-slim", default=None,
              help="Keep only the final model and its logs (no best/, no last/ with optimizer state). [default: no]")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help="CPU threads per process. [default: the cores left after the loader workers]")
@click.option("--force", is_flag=True,
              help="Replace another run's checkpoint in --out (other model or settings) instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def train_cmd(out: str, resume: str | None, baseline_json: tuple[str, ...], quiet: bool, force: bool,
              preset: str | None, **options: Any) -> None:
    """Train a multi-task model (runs under torchrun for several processes / GPUs)."""
    from mtlora.evaluate import load_baselines
    from mtlora.train import read_resume_point, train

    model_values = {k: options.pop(k) for k in MODEL_OPTION_NAMES}
    explicit = {k: options.pop(k) for k in _TRAIN_OPTION_NAMES}
    if options:
        raise click.UsageError(f"unexpected options {sorted(options)}")
    saved = None
    model_config = None
    if resume is not None:
        if explicit["pretrained"]:
            raise click.BadParameter("cannot be combined with --resume (the checkpoint has the weights)",
                                     param_hint="--pretrained")
        saved = read_resume_point(resume).train_config
        # Model flags (or a preset) are only checked against the checkpoint, never applied over it.
        if preset or any(v is not None for v in model_values.values()):
            model_config = model_config_from_options(preset=preset, **model_values)
    else:
        model_config = model_config_from_options(preset=preset, **model_values)
    baselines = load_baselines(baseline_json) if baseline_json else None
    config = resolve_train_config(explicit, preset, saved, baselines)
    if not quiet:
        _setup_logging()
    else:  # PyTorch's advice when --workers exceeds the cores is 4 lines of noise under --quiet
        warnings.filterwarnings("ignore", message="This DataLoader will create")
    result = train(model_config, config, Path(out), resume=resume, progress=False if quiet else None, force=force)
    if result.metrics is not None and _is_main_process():
        from mtlora.evaluate import primary_metrics

        summary = ", ".join(f"{t} {n} {v:.2f}" for t, (n, v) in primary_metrics(result.metrics).items())
        delta = result.metrics.get("delta_m")
        click.echo(f"trained {result.epochs} epochs in {result.seconds:.0f} s -> {out}: {summary}"
                   + (f", delta_m {delta:+.2f}%" if delta is not None else ""))


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
