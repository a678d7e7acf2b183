"""Model options shared by `mtlora train` and `mtlora info`, and the named presets.

Every option defaults to None, so a command can tell a flag the user typed
from one it did not: an explicit flag always wins, then the `--preset`, then
the official MTLoRA recipe (`MODEL_DEFAULTS`). Nothing a user typed is ever
replaced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from mtlora.config import (
    ADAPTER_KINDS,
    DECODER_HEADS,
    SHARED_MODES,
    SWIN_VARIANTS,
    AdapterConfig,
    ModelConfig,
    SwinConfig,
)
from mtlora.errors import ConfigError

# The official recipe (scale-lab/MTLoRA, configs/mtlora/tiny_448/mtlora_tiny_448_r16_scale4_pertask.yaml):
# Swin-T at 448, the four PASCAL-Context tasks, shared rank 16, task rank 4, scale 4, LoRA dropout 0.05,
# drop path 0.2.
MODEL_DEFAULTS: dict[str, Any] = {
    "variant": "swin_tiny",
    "img_size": 448,
    "tasks": ("semseg", "human_parts", "sal", "normals"),
    "adapter": "mtlora",
    "shared_rank": (16,),
    "task_rank": (4,),
    "shared_scale": (4.0,),
    "task_scale": (4.0,),
    "shared_mode": "matrix",
    "lora_dropout": 0.05,
    "drop_path": 0.2,
    "decoder_channels": (18, 36, 72, 144),
    "decoder_heads": (),  # (task, head) pairs; a task not named gets the HRNet head
    "segformer_channels": 256,
}
MODEL_OPTION_NAMES = tuple(MODEL_DEFAULTS)

# A preset fills in model and training options the user did not give. "default" is the model
# shipped in mtlora/assets/default: small enough to train from scratch on a laptop CPU in minutes.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "model": {
            "variant": "swin_micro",
            "img_size": 64,
            "tasks": ("semseg", "human_parts", "sal", "normals"),
            "adapter": "mtlora",
            "shared_rank": (8,),
            "task_rank": (4,),
            "shared_scale": (4.0,),
            "task_scale": (4.0,),
            "shared_mode": "matrix",
            # From random init there is nothing to regularise towards; dropout only slows learning.
            "lora_dropout": 0.0,
            "drop_path": 0.0,
            # Two thirds of the official HRNet widths keep the shipped weights under 10 MB.
            "decoder_channels": (12, 24, 48, 96),
        },
        "train": {
            "data": "synthetic",
            "epochs": 6,
            "warmup_epochs": 1.0,
            "batch_size": 16,
            "lr": 2e-3,
            "train_samples": 640,
            "val_samples": 128,
            "eval_every": 1,
            "eval_initial": True,
            "save_every": 0,
            "slim": True,
        },
    },
}


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _numbers(cast: type, what: str) -> Callable:
    """Click callback: "16" or "16,16,8,8" (one value, or one per stage) -> tuple."""

    def callback(_ctx, param, value):
        if value is None:
            return None
        parts = _split(value)
        if not parts:
            raise click.BadParameter(f"needs {what}: one value, or one per stage separated by commas", param=param)
        try:
            numbers = tuple(cast(p) for p in parts)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not {what} (e.g. '4' or '4,4,8,8')", param=param) from None
        if not all(0 < n < math.inf for n in numbers):  # NaN fails every comparison, so it lands here too
            raise click.BadParameter(f"values must be positive finite numbers, got {value!r}", param=param)
        return numbers

    return callback


def _finite(_ctx, param, value):
    # click's FloatRange lets NaN through: it fails both bound comparisons, so neither bound rejects it.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param=param)
    return value


def _tasks_callback(_ctx, param, value):
    if value is None:
        return None
    tasks = tuple(_split(value))
    if not tasks:
        raise click.BadParameter("needs at least one task, e.g. 'semseg,normals'", param=param)
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise click.BadParameter(f"task(s) {', '.join(duplicates)} listed twice", param=param)
    return tasks


def _decoder_heads_callback(_ctx, param, value):
    """Click callback: "semseg=segformer,sal=aspp" -> (("semseg", "segformer"), ("sal", "aspp"))."""
    if value is None:
        return None
    pairs = []
    for part in _split(value):
        task, sep, head = (p.strip() for p in part.partition("="))
        if not sep or not task or head not in DECODER_HEADS:
            raise click.BadParameter(f"{part!r} is not TASK=HEAD with HEAD one of {', '.join(DECODER_HEADS)}",
                                     param=param)
        if task in dict(pairs):  # dict() would keep only the last: say so rather than pick one
            raise click.BadParameter(f"task {task!r} is given a head twice", param=param)
        pairs.append((task, head))
    return tuple(pairs)


def _default_text(name: str) -> str:
    value = MODEL_DEFAULTS[name]
    if isinstance(value, tuple):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"[default: {value}]"


def model_options(func: Callable) -> Callable:
    """Stack the model options (and `--preset`) onto a click command."""
    options = [
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
                     help="Fill in every option not given on the command line from a named preset. "
                          "'default': swin_micro at 64x64 on the synthetic set, the shipped model."),
        click.option("--variant", type=click.Choice(list(SWIN_VARIANTS)), default=None,
                     help=f"Swin backbone size. {_default_text('variant')}"),
        click.option("--img-size", type=click.IntRange(min=1), default=None,
                     help=f"Square input size in pixels. {_default_text('img_size')}"),
        click.option("--tasks", default=None, callback=_tasks_callback,
                     help=f"Comma-separated tasks, in output order. {_default_text('tasks')}"),
        click.option("--adapter", type=click.Choice(ADAPTER_KINDS), default=None,
                     help=f"What is trained in the backbone. {_default_text('adapter')}"),
        click.option("--shared-rank", default=None, callback=_numbers(int, "an integer rank"),
                     help=f"Rank of the task-agnostic LoRA, one value or one per stage. {_default_text('shared_rank')}"),
        click.option("--task-rank", default=None, callback=_numbers(int, "an integer rank"),
                     help=f"Rank of each task-specific LoRA, one value or one per stage. {_default_text('task_rank')}"),
        click.option("--shared-scale", default=None, callback=_numbers(float, "a number"),
                     help=f"Multiplier of the task-agnostic update. {_default_text('shared_scale')}"),
        click.option("--task-scale", default=None, callback=_numbers(float, "a number"),
                     help=f"Multiplier of the task-specific updates. {_default_text('task_scale')}"),
        click.option("--shared-mode", type=click.Choice(SHARED_MODES), default=None,
                     help=f"How task layers combine the shared update. {_default_text('shared_mode')}"),
        click.option("--lora-dropout", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
                     help=f"Dropout on the adapter inputs. {_default_text('lora_dropout')}"),
        click.option("--drop-path", type=click.FloatRange(0.0, 1.0, max_open=True), default=None, callback=_finite,
                     help=f"Stochastic depth rate of the backbone. {_default_text('drop_path')}"),
        click.option("--decoder-channels", default=None, callback=_numbers(int, "a channel count"),
                     help=f"HRNet decoder channels, one per stage. {_default_text('decoder_channels')}"),
        click.option("--decoder-heads", default=None, callback=_decoder_heads_callback,
                     help=f"Decoder head per task, e.g. 'semseg=segformer,sal=aspp' ({', '.join(DECODER_HEADS)}); "
                          "tasks not named get the HRNet head."),
        click.option("--segformer-channels", type=click.IntRange(min=1), default=None,
                     help=f"Embedding width of SegFormer heads. {_default_text('segformer_channels')}"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def resolve_model_options(preset: str | None = None, **options: Any) -> dict[str, Any]:
    """Explicit values, then the preset's, then `MODEL_DEFAULTS`; unknown names are refused."""
    unknown = sorted(set(options) - set(MODEL_OPTION_NAMES))
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(unknown)}")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    from_preset = PRESETS[preset]["model"] if preset else {}
    resolved = {}
    for name in MODEL_OPTION_NAMES:
        value = options.get(name)
        if value is None:
            value = from_preset.get(name, MODEL_DEFAULTS[name])
        resolved[name] = value
    return resolved


def model_config_from_options(
    preset: str | None = None, task_channels: dict[str, int] | None = None, **options: Any
) -> ModelConfig:
    """The ModelConfig the model options describe (None = not given; see `resolve_model_options`).

    `task_channels` overrides output channels per task (a data set's class counts).
    """
    values = resolve_model_options(preset, **options)
    tasks = tuple(values["tasks"])
    swin = SwinConfig.from_variant(values["variant"], img_size=int(values["img_size"]),
                                   drop_path_rate=float(values["drop_path"]))
    adapter = AdapterConfig(
        kind=values["adapter"],
        shared_rank=tuple(values["shared_rank"]),
        shared_scale=tuple(values["shared_scale"]),
        task_rank={t: tuple(values["task_rank"]) for t in tasks},
        task_scale={t: tuple(values["task_scale"]) for t in tasks},
        shared_mode=values["shared_mode"],
        dropout=float(values["lora_dropout"]),
    )
    channels = {t: task_channels[t] for t in tasks if task_channels and t in task_channels}
    decoder = tuple(values["decoder_channels"])
    if len(decoder) == 1:
        decoder = decoder * swin.num_stages
    return ModelConfig(swin=swin, adapter=adapter, tasks=tasks, task_channels=channels, decoder_channels=decoder,
                       decoder_heads=dict(values["decoder_heads"]), segformer_channels=int(values["segformer_channels"]))
