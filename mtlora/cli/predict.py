"""`mtlora predict`: the PyTorch model's outputs for images or a normalised batch, one array per task."""

from __future__ import annotations

from pathlib import Path

import click

from mtlora.errors import ConfigError, DataError


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


@click.command("predict")
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
