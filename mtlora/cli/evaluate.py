"""`mtlora evaluate`: a thin command over `mtlora.evaluate`, scoring a checkpoint on a data set split."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mtlora.data.datasets import DATASET_NAMES
from mtlora.errors import ConfigError
from mtlora.train.config import MAX_SAMPLES, MAX_WORKERS


@click.command("evaluate")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--data", type=click.Choice(DATASET_NAMES), required=True, help="Data set to evaluate on.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Extracted PASCAL-Context / NYUD-v2 folder.")
@click.option("--split", default="val", show_default=True, help="Split to evaluate.")
@click.option("--samples", type=click.IntRange(1, MAX_SAMPLES), default=None,
              help="Synthetic data only: number of scenes. [default: 200]")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=0, show_default=True, help="Data loader processes.")
@click.option("--baseline-json", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Single-task baselines for Delta_m (repeatable). [default: the paper's for PASCAL]")
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(("fp32", "bf16")), default="fp32", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the full results as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: on a terminal]")
def evaluate_cmd(checkpoint: str, data: str, data_root: str | None, split: str, samples: int | None,
                 batch_size: int, workers: int, baseline_json: tuple[str, ...], device: str, precision: str,
                 json_out: str | None, progress: bool | None) -> None:
    """Score CHECKPOINT on a data set split: every metric per task, and Delta_m where baselines exist."""
    import torch

    from mtlora.checkpoint import write_json_atomic
    from mtlora.data.datasets import build_dataset
    from mtlora.evaluate import default_baselines, evaluate, format_results, json_ready, load_baselines
    from mtlora.loading import load_any
    from mtlora.metrics import TASK_METRICS
    from mtlora.train import check_tasks

    if data == "synthetic" and data_root is not None:
        raise click.BadParameter("the synthetic data set is generated; it takes no data root", param_hint="--data-root")
    if data != "synthetic" and data_root is None:
        raise click.UsageError(f"--data {data} needs --data-root (the extracted folder)")
    if data != "synthetic" and samples is not None:
        raise click.BadParameter(f"sizes the synthetic data set only; {data} uses its split files",
                                 param_hint="--samples")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("PyTorch sees no CUDA GPU", param_hint="--device")
    target = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    baselines = load_baselines(baseline_json) if baseline_json else default_baselines(data)
    unknown = sorted(set(baselines or {}) - set(TASK_METRICS))
    if unknown:  # a typo'd task would silently leave Delta_m unreported
        raise click.BadParameter(f"names unknown task(s) {', '.join(map(repr, unknown))}; tasks are "
                                 f"{', '.join(TASK_METRICS)}", param_hint="--baseline-json")

    model = load_any(checkpoint).to(target)
    config = model.config
    channels = check_tasks(data, data_root, tuple(model.tasks))
    mismatch = {t: (config.task_channels[t], channels[t]) for t in model.tasks if config.task_channels[t] != channels[t]}
    if mismatch:
        raise ConfigError(
            "the checkpoint's heads do not fit the data set: "
            + ", ".join(f"{t} has {a} outputs, {data} has {b} classes" for t, (a, b) in mismatch.items())
        )
    dataset = build_dataset(data, data_root, split, tuple(model.tasks), config.swin.img_size, train=False, seed=0,
                            **({"num_samples": samples} if data == "synthetic" else {}))
    show = sys.stderr.isatty() if progress is None else progress
    results = evaluate(model, dataset, model.tasks, batch_size=batch_size, device=target, workers=workers,
                       baselines=baselines, precision=precision, progress=show)
    results = json_ready({"checkpoint": str(checkpoint), "data": data, "split": split, **results})
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, results)
    click.echo(format_results(results))
