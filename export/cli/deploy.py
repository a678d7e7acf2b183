"""`mtlora-export bundle` and `mtlora-export run`: carry a model to a device and run it there."""

from __future__ import annotations

import re
from pathlib import Path

import click

from export.cli.options import say, threads_option
from export.errors import ExportError

# An image this small carries nothing the model can use; upscaling it silently would hide a mistake.
MIN_IMAGE_SIDE = 8


@click.command("bundle")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Bundle directory (a .tar.gz is written beside it).")
@click.option("--allow-failed", is_flag=True,
              help="Bundle a build that failed its accuracy gate (bundle.json and the bundle's README say so).")
def bundle(build_dir: str, out: str, allow_failed: bool) -> None:
    """Write a self-contained deployment bundle: ONNX graphs, references, eval images, the build's
    tolerances, a wheel of mtlora-export with the versions it was tested with, and a README.

    A build that failed its accuracy gate is refused (exit 1) unless --allow-failed.
    """
    from export.artifacts.bundle import make_bundle

    directory, archive = make_bundle(build_dir, out, say, allow_failed=allow_failed)
    click.echo(f"bundle: {directory}\narchive: {archive}\nsee {directory}/README.md for the commands on the device")


def safe_stem(path: str) -> str:
    """A file name's stem fit to name an output file: no control characters, separators or leading dots."""
    stem = re.sub(r"[\x00-\x1f\x7f/\\]+", "_", Path(path).stem).lstrip(".")
    return stem or "image"


def _load(path: str, size: int):
    import numpy as np

    from mtlora.data.preprocess import load_image

    image_path = Path(path)
    if image_path.is_dir():
        raise ExportError(f"--image {path}: is a directory; pass image files (e.g. --image {path}/photo.jpg)")
    image = load_image(image_path)
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ExportError(f"--image {path}: {width}x{height} pixels is too small to run on (at least "
                          f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}; the model's input is {size}x{size})")
    if size > 2 * min(height, width):
        say(f"[run] {path}: {width}x{height} is upscaled to the model's {size}x{size} input")
    return np.asarray(image)


@click.command("run")
@click.argument("engine", type=click.Path(exists=True))
@click.option("--image", "images", required=True, multiple=True, type=click.Path(),
              help="Image file to run (repeatable).")
@click.option("--out", default="prediction.npz", show_default=True, type=click.Path(dir_okay=False),
              help="Per-task outputs as .npz; a PNG per task and image is written beside it.")
@threads_option
def run(engine: str, images: tuple[str, ...], out: str, threads: int | None) -> None:
    """Run ENGINE (an engine directory of a build) on images and write per-task outputs."""
    import io

    import numpy as np
    from PIL import Image

    from export.artifacts.engineset import open_engine
    from export.artifacts.files import write_bytes_atomic
    from export.checking.visualize import render_output

    out_path = Path(out)
    if out_path.suffix != ".npz":
        raise click.BadParameter("must end in .npz", param_hint="--out")
    model = open_engine(engine, threads)
    batch = np.stack([model.interface.preprocess(_load(p, model.interface.size)) for p in images])
    with model:
        outputs = model.infer(batch)
        seconds = model.last_seconds or float("nan")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from mtlora.fileio import why_not_writable

        raise ExportError(f"--out {out}: cannot create its directory ({why_not_writable(out_path, err)})") from None
    buffer = io.BytesIO()
    np.savez(buffer, **outputs)
    write_bytes_atomic(out_path, buffer.getvalue())
    for i, image in enumerate(images):
        for task, value in outputs.items():
            png = io.BytesIO()
            Image.fromarray(render_output(task, value[i], model.interface.kind(task))).save(png, format="PNG")
            write_bytes_atomic(out_path.with_name(f"{out_path.stem}_{safe_stem(image)}_{task}.png"), png.getvalue())
    shapes = ", ".join(f"{t} {tuple(v.shape)}" for t, v in outputs.items())
    click.echo(f"{model.entry.key}: {len(images)} image(s) in {1000 * seconds:.1f} ms -> {out_path} ({shapes})")
