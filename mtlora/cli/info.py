"""`mtlora info`: architecture summary and parameter counts of a checkpoint, config or official .pth."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mtlora.errors import ConfigError


def _model_for_info(source: str | None, options: dict):
    """The model SOURCE describes; an official .pth is read once and its weights loaded (and so checked)."""
    from mtlora.checkpoint import read_config
    from mtlora.model import MultiTaskSwin

    if source is None:
        from mtlora.cli.options import model_config_from_options

        return MultiTaskSwin(model_config_from_options(**options))
    path = Path(source)
    if path.is_file() and path.suffix not in (".json",):
        from mtlora.upstream import import_upstream

        return import_upstream(path)  # names, shapes, kinds and finite values, as every command checks them
    return MultiTaskSwin(read_config(path))


def _format_info(config, counts) -> str:
    swin, adapter = config.swin, config.adapter
    lines = [
        f"backbone      Swin embed {swin.embed_dim}, depths {list(swin.depths)}, heads {list(swin.num_heads)}, "
        f"window {swin.window_size}, input {swin.img_size}x{swin.img_size}",
        f"adapter       {adapter.kind}"
        + (f" (shared rank {list(adapter.shared_rank)}, scale {list(adapter.shared_scale)}, "
           f"mode {adapter.shared_mode})" if adapter.has_adapters else ""),
        "tasks         " + ", ".join(f"{t} ({config.task_channels[t]})" for t in config.tasks),
        "",
        f"parameters    total {counts.total:>12,}",
        f"              trainable {counts.trainable:>8,}  ({counts.trainable / 1e6:.3f}M, "
        f"{100 * counts.trainable / max(counts.total, 1):.2f}%)",
        f"  shared adapters  {counts.shared_adapters:>10,}",
        f"  task adapters    {counts.task_adapters:>10,}",
        f"  decoders         {counts.decoders:>10,}  (incl. per-task downsamplers)",
        f"  other trainable  {counts.other_trainable:>10,}  (patch embed, norms, position bias, merging)",
    ]
    if counts.per_task_adapters and any(counts.per_task_adapters.values()):
        lines.append("per-task adapter size")
        lines += [f"  {t:<15} {n:>10,}" for t, n in counts.per_task_adapters.items()]
    return "\n".join(lines)


def _model_options(func):
    try:
        from mtlora.cli.options import model_options
    except ImportError:
        return func
    return model_options(func)


@click.command("info")
@click.argument("source", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_model_options
def info(source: str | None, as_json: bool, **options) -> None:
    """Architecture summary and parameter counts of SOURCE (checkpoint, config JSON or official .pth),
    or of the model the options describe."""
    from mtlora.params import count_parameters

    model = _model_for_info(source, options)
    config = model.config
    counts = count_parameters(model)
    weights = _check_weights(source, model)
    if as_json:
        click.echo(json.dumps({"config": config.to_dict(), "parameters": counts.to_dict(), "weights": weights},
                              indent=2, sort_keys=True))
    else:
        click.echo(_format_info(config, counts))
        click.echo(f"weights       {weights}")


def _check_weights(source: str | None, model) -> str:
    """What `info` checked of a checkpoint's weights, in one line (a damaged file is an error)."""
    from mtlora.checkpoint import WEIGHTS_FILE, resolve_checkpoint_dir, weights_header

    if source is None:
        return "none (a model described by options)"
    path = Path(source)
    if path.is_file() and path.suffix != ".json":
        return "read in full and loaded (official .pth): names, shapes, kinds and finite values checked"
    if path.suffix == ".json":
        return "not checked (a config file; no weights)"
    shapes = weights_header(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))
        odd = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
        what = f"{len(missing)} missing (e.g. {missing[0]})" if missing else f"{odd[0]} has shape {shapes[odd[0]]}" \
            if odd else f"{len(set(shapes) - set(expected))} unexpected"
        raise ConfigError(f"{resolve_checkpoint_dir(path) / WEIGHTS_FILE}: does not fit config.json ({what})")
    return f"{WEIGHTS_FILE}: header checked, {len(shapes)} tensors of the shapes config.json implies (values not read)"
