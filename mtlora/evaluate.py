"""Evaluate a multi-task model on a data set: every metric of every task, and the multi-task delta.

Streaming: each batch updates the numpy meters of `mtlora.metrics` and is
dropped, so memory stays flat however large the split is. The multi-task
delta (the paper's Delta_m) needs single-task baselines: PASCAL-Context has
the paper's; for other data sets pass them (`load_baselines`), otherwise no
delta is reported.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtlora.data.datasets import collate
from mtlora.errors import ConfigError, DataError, MTLoRAError
from mtlora.metrics import PASCAL_SINGLE_TASK_BASELINES, TASK_METRICS, make_evaluator, multi_task_delta
from mtlora_base.numbers import is_finite_number

SEGMENTATION_TASKS = ("semseg", "human_parts")


def default_baselines(data: str) -> dict[str, float] | None:
    """The single-task baselines the paper reports for `data`, or None when there are none."""
    return dict(PASCAL_SINGLE_TASK_BASELINES) if data == "pascal" else None


def load_baselines(paths: Iterable[str | Path]) -> dict[str, float]:
    """Single-task baselines from JSON files, merged in order.

    A file holds either `{task: primary metric}` or an `mtlora evaluate --json`
    report (its `tasks` section; the primary metric of each task is taken), so
    the reports of single-task models can be passed as they are.
    """
    baselines: dict[str, float] = {}
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read baselines ({err})") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: baselines are not valid JSON ({err})") from None
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
            data = data["tasks"]
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{path}: expected a JSON object of task -> primary metric")
        for task, value in data.items():
            if isinstance(value, Mapping):
                if task not in TASK_METRICS or TASK_METRICS[task][0] not in value:
                    raise ConfigError(f"{path}: no primary metric for task {task!r}")
                value = value[TASK_METRICS[task][0]]
            if not is_finite_number(value) or value == 0:
                raise ConfigError(f"{path}: baseline of {task!r} must be a non-zero number, got {value!r}")
            baselines[task] = float(value)
    return baselines


def worker_settings(workers: int, persistent: bool) -> dict:
    """DataLoader worker processes start from a fresh server process (forkserver), not as forks of this
    one: a fork copies whatever threads the process holds (OpenVINO's and NNCF's pools, when a build ran
    here first), and such a child can crash its parent. `persistent`: they live for the whole run (a
    training run's epochs), so each starts once."""
    if workers <= 0:
        return {}
    return {"multiprocessing_context": "forkserver", **({"persistent_workers": True} if persistent else {})}


def worker_error(err: BaseException) -> str:
    """The one-line message of an error, also when a DataLoader worker wrapped it in its traceback."""
    text = str(err)
    if not text.startswith("Caught "):
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    # "mtlora.errors.DataError: image file is corrupt ..." -> the message alone
    head, sep, message = last.partition(": ")
    return message if sep and "." in head and " " not in head else last


def primary_metrics(results: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
    """task -> (name, value) of the metric Delta_m compares."""
    out = {}
    for task, metrics in results["tasks"].items():
        name = TASK_METRICS[task][0] if task in TASK_METRICS else next(iter(metrics))
        out[task] = (name, metrics[name])
    return out


def _check_tasks(model, dataset, tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in model.tasks]
    if unknown:
        raise ConfigError(f"the model has no task(s) {unknown}; it predicts {', '.join(model.tasks)}")
    have = getattr(dataset, "tasks", None)
    if have is not None:
        missing = [t for t in tasks if t not in have]
        if missing:
            raise DataError(f"the data set has no labels for task(s) {', '.join(missing)}; it has {', '.join(have)}")


def evaluate(
    model: torch.nn.Module,
    dataset,
    tasks: Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    workers: int = 0,
    baselines: Mapping[str, float] | None = None,
    criterion: torch.nn.Module | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, Any]:
    """Run `model` over `dataset` in eval mode and score every task.

    `dataset` yields the dicts of `mtlora.data.datasets` (model-ready images
    and labels at the model's input size). Returns::

        {"tasks": {task: {metric: value, ...}},   # all metrics of mtlora.metrics, percent / degrees / metres
         "primary": {task: {"metric", "value", "higher_is_better"}},
         "delta_m": float | None,                 # percent; None without a baseline for every task
         "baselines": {task: value} | None,
         "loss": {"total": ..., task: ...},       # only with `criterion` (unweighted per task)
         "num_samples": int}
    """
    tasks = tuple(tasks) if tasks is not None else tuple(model.tasks)
    if not tasks:
        raise ConfigError("evaluate needs at least one task")
    _check_tasks(model, dataset, tasks)
    if len(dataset) == 0:
        raise DataError("the evaluation split is empty; check the data root and the split name")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    channels = model.config.task_channels
    meters = {t: make_evaluator(t, channels[t] if t in SEGMENTATION_TASKS else None) for t in tasks}
    loss_sums = torch.zeros(len(tasks) + 1, dtype=torch.float64)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                        **worker_settings(workers, persistent=False))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc="evaluate", leave=False, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    count = 0
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    try:
        with torch.inference_mode():
            batches = iter(loader)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except MTLoRAError as err:
                    raise type(err)(worker_error(err)) from None
                image = batch["image"].to(device)
                with autocast:
                    outputs = dict(zip(model.tasks, model(image), strict=True))
                outputs = {t: outputs[t].float() for t in tasks}
                for t in tasks:
                    label = batch[t]
                    if t in SEGMENTATION_TASKS:
                        _check_classes(t, label, channels[t])
                    meters[t].update(outputs[t].cpu().numpy(), label.numpy())
                if criterion is not None:
                    targets = {t: batch[t].to(device) for t in tasks}
                    total, per_task = criterion(outputs, targets)
                    n = image.shape[0]
                    loss_sums += torch.tensor([float(total)] + [float(per_task[t]) for t in tasks],
                                              dtype=torch.float64) * n
                count += image.shape[0]
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)

    results: dict[str, Any] = {"tasks": {t: meters[t].result() for t in tasks}, "num_samples": count}
    results["primary"] = {
        t: {"metric": name, "value": value, "higher_is_better": TASK_METRICS[t][1]}
        for t, (name, value) in primary_metrics(results).items()
    }
    results["baselines"] = dict(baselines) if baselines else None
    results["delta_m"] = None
    if baselines and set(tasks) <= set(baselines):
        values = {t: results["tasks"][t] for t in tasks}
        if all(math.isfinite(results["tasks"][t][TASK_METRICS[t][0]]) for t in tasks):
            results["delta_m"] = multi_task_delta(values, baselines)
    if criterion is not None:
        means = (loss_sums / max(count, 1)).tolist()
        results["loss"] = {"total": means[0], **dict(zip(tasks, means[1:], strict=True))}
    return results


def _check_classes(task: str, label: torch.Tensor, num_classes: int) -> None:
    valid = label[label != 255]
    if valid.numel() and int(valid.max()) >= num_classes:
        raise DataError(
            f"{task}: the data has class {int(valid.max())} but the model's head has {num_classes} outputs; "
            "the checkpoint was trained on another data set"
        )


def format_results(results: Mapping[str, Any]) -> str:
    """A plain table: one line per scalar metric, the primary metric of each task marked with '*'."""
    lines = [f"{'task':<13} {'metric':<16} {'value':>10}"]
    for task, metrics in results["tasks"].items():
        primary = results["primary"][task]["metric"]
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or name.endswith("threshold"):
                continue
            mark = "*" if name == primary else " "
            lines.append(f"{task:<13} {name + mark:<16} {value:>10.3f}")
    if "loss" in results:
        lines.append(f"{'loss':<13} {'total':<16} {results['loss']['total']:>10.4f}")
    if results.get("delta_m") is not None:
        lines.append(f"delta_m {results['delta_m']:+.2f}% vs single-task baselines "
                     + ", ".join(f"{t} {v:g}" for t, v in results["baselines"].items() if t in results["tasks"]))
    else:
        lines.append("delta_m not reported: no single-task baseline for every task (pass --baseline-json)")
    lines.append(f"({results['num_samples']} samples; * = primary metric)")
    return "\n".join(lines)


def json_ready(value: Any) -> Any:
    """NaN and infinities become null, so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
