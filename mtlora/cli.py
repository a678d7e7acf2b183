"""`mtlora`: the model and training side (info, import-upstream, predict, train, evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mtlora import __version__
from mtlora.cli_support import ErrorHandlingGroup, debug_option
from mtlora.errors import ConfigError, DataError


class MTLoRAGroup(ErrorHandlingGroup):
    lazy_commands = {"train": "mtlora.cli_train:train_cmd", "evaluate": "mtlora.cli_train:evaluate_cmd"}


@click.group(cls=MTLoRAGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtlora")
@debug_option
def main() -> None:
    """Multi-task Swin Transformers with MTLoRA adapters: inspect, import, train, evaluate, predict."""


def _config_for_info(source: str | None, options: dict):
    from mtlora.checkpoint import read_config

    if source is None:
        from mtlora.cli_options import model_config_from_options

        return model_config_from_options(**options)
    path = Path(source)
    if path.is_file() and path.suffix not in (".json",):
        from mtlora.upstream import read_upstream

        return read_upstream(path)[0]
    return read_config(path)


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
        from mtlora.cli_options import model_options
    except ImportError:
        return func
    return model_options(func)


@main.command("info")
@click.argument("source", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_model_options
def info(source: str | None, as_json: bool, **options) -> None:
    """Architecture summary and parameter counts of SOURCE (checkpoint, config JSON or official .pth),
    or of the model the options describe."""
    from mtlora.model import MultiTaskSwin
    from mtlora.params import count_parameters

    config = _config_for_info(source, options)
    model = MultiTaskSwin(config)
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
        return "read in full (official .pth)"
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


@main.command("import-upstream")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Directory for our checkpoint.")
def import_upstream_cmd(checkpoint: str, out: str) -> None:
    """Convert a checkpoint written by the official MTLoRA code into our format (no pickle)."""
    from mtlora.checkpoint import save_checkpoint
    from mtlora.upstream import import_upstream

    model = import_upstream(checkpoint)
    save_checkpoint(model, out, {"source": str(Path(checkpoint).name), "imported_from": "scale-lab/MTLoRA"})
    click.echo(f"imported {checkpoint} -> {out} ({model.config.adapter.kind}, tasks {', '.join(model.tasks)})")


def _read_npz_batch(path: Path, size: tuple[int, int]) -> numpy.ndarray:  # noqa: F821
    import numpy as np

    from mtlora.data.preprocess import NPZ_READ_ERRORS, open_npz
    from mtlora_base.numbers import count_non_finite

    try:
        data = open_npz(path)
    except NPZ_READ_ERRORS as err:
        raise DataError(f"{path}: not a readable .npz ({err}); expected one with an 'input' array, "
                        "a normalised NCHW batch") from None
    with data:
        if "input" not in data.files:
            raise DataError(f"{path}: has no 'input' array (expected a normalised NCHW batch)")
        try:
            raw = data["input"]
        except NPZ_READ_ERRORS as err:
            raise DataError(f"{path}: 'input' cannot be read ({err})") from None
    if raw.dtype.kind not in "fiu":
        raise DataError(f"{path}: 'input' has dtype {raw.dtype}, expected float32 (a normalised NCHW batch)")
    batch = raw.astype(np.float32)
    expected = (3, *size)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.shape[0] == 0:
        raise DataError(f"{path}: 'input' has shape {batch.shape}, the model expects (N, {', '.join(map(str, expected))})")
    bad = count_non_finite(batch)
    if bad:
        raise DataError(f"{path}: 'input' holds NaN or Inf values ({bad} of {batch.size})")
    return batch


def _read_inputs(inputs: tuple[str, ...], config) -> numpy.ndarray:  # noqa: F821
    import numpy as np

    from mtlora.data.preprocess import load_image, preprocess

    size = (config.swin.img_size, config.swin.img_size)
    batches = []
    for item in inputs:
        path = Path(item)
        if path.suffix == ".npz":
            batches.append(_read_npz_batch(path, size))
        else:
            batches.append(preprocess(load_image(path), size=size, mean=config.mean, std=config.std)[None])
    return np.concatenate(batches, axis=0)


@main.command("predict")
@click.argument("checkpoint", type=click.Path())
@click.option("--input", "inputs", required=True, multiple=True, type=click.Path(),
              help="An image file, or an .npz whose 'input' is a normalised NCHW batch. Repeatable.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz, one array per task.")
def predict(checkpoint: str, inputs: tuple[str, ...], out: str) -> None:
    """Run the PyTorch model (eval mode, fp32) and write one array per task, named after the task."""
    import io

    import numpy as np
    import torch

    from mtlora.fileio import why_not_writable, write_bytes_atomic
    from mtlora.loading import load_any

    out_path = Path(out)
    if out_path.suffix != ".npz":
        raise click.BadParameter("must end in .npz", param_hint="--out")
    if out_path.is_dir():
        raise click.BadParameter("is a directory; give a file name ending in .npz", param_hint="--out")
    model = load_any(checkpoint)
    batch = _read_inputs(inputs, model.config)
    with torch.inference_mode():
        outputs = model.predict(torch.from_numpy(batch))
    buffer = io.BytesIO()
    np.savez(buffer, input=batch, **{t: v.numpy() for t, v in outputs.items()})
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create its directory ({why_not_writable(out_path, err)})") from None
    write_bytes_atomic(out_path, buffer.getvalue())
    shapes = ", ".join(f"{t} {tuple(v.shape)}" for t, v in outputs.items())
    click.echo(f"wrote {out_path}: {shapes}")


if __name__ == "__main__":
    main()
