"""`mtlora-export bundle` and `mtlora-export run`: carry a model to a device and run it there."""

from __future__ import annotations

from pathlib import Path

import click

from export.cli import main
from export.errors import ExportError


def _say(line: str) -> None:
    click.echo(line, err=True)


@main.command("bundle")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Bundle directory (a .tar.gz is written beside it).")
def bundle(build_dir: str, out: str) -> None:
    """Write a self-contained deployment bundle (ONNX graphs, references, eval images, README)."""
    from export.artifacts.bundle import make_bundle

    directory, archive = make_bundle(build_dir, out, _say)
    click.echo(f"bundle: {directory}\narchive: {archive}\nsee {directory}/README.md for the commands on the device")


def _engine_entry(engine: Path):
    from export.artifacts.engineset import ENGINE_INDEX, EngineEntry

    if engine.is_file():
        engine = engine.parent
    if not (engine / ENGINE_INDEX).is_file():
        raise ExportError(f"{engine}: not an engine directory (expected BUILD/engines/<backend>-<precision>)")
    return EngineEntry.read(engine)


@main.command("run")
@click.argument("engine", type=click.Path(exists=True))
@click.option("--image", "images", required=True, multiple=True, type=click.Path(),
              help="Image file to run (repeatable).")
@click.option("--out", default="prediction.npz", show_default=True, type=click.Path(dir_okay=False),
              help="Per-task outputs as .npz; a PNG per task and image is written beside it.")
@click.option("--threads", type=click.IntRange(min=1))
def run(engine: str, images: tuple[str, ...], out: str, threads: int | None) -> None:
    """Run ENGINE (an engine directory of a build) on images and write per-task outputs."""
    import io

    import numpy as np
    from PIL import Image

    from engines.files import write_atomic
    from export.artifacts.engineset import load_runner
    from export.checking.visualize import render_output
    from mtlora.data.preprocess import load_image, preprocess

    out_path = Path(out)
    if out_path.suffix != ".npz":
        raise click.BadParameter("must end in .npz", param_hint="--out")
    entry = _engine_entry(Path(engine))
    entry.artifacts(verify=True)
    model = entry.model
    if not model:
        raise ExportError(f"{engine}: engine.json lacks the model's input description; rebuild the engine")
    size = int(model["input_size"])
    batch = np.stack([preprocess(load_image(p), size=(size, size), mean=model["mean"], std=model["std"])
                      for p in images]).astype(np.float32)
    with load_runner(entry, threads) as runner:
        outputs = runner.infer({"image": batch})
        seconds = runner.timings[-1] if runner.timings else float("nan")
    outputs = {t: np.asarray(outputs[t]) for t in model["tasks"]}
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from mtlora.fileio import why_not_writable

        raise ExportError(f"--out {out}: cannot create its directory ({why_not_writable(out_path, err)})") from None
    buffer = io.BytesIO()
    np.savez(buffer, **outputs)
    write_atomic(out_path, buffer.getvalue())
    for i, image in enumerate(images):
        for task, value in outputs.items():
            png = io.BytesIO()
            Image.fromarray(render_output(task, value[i])).save(png, format="PNG")
            write_atomic(out_path.with_name(f"{out_path.stem}_{Path(image).stem}_{task}.png"), png.getvalue())
    shapes = ", ".join(f"{t} {tuple(v.shape)}" for t, v in outputs.items())
    click.echo(f"{entry.key}: {len(images)} image(s) in {1000 * seconds:.1f} ms -> {out_path} ({shapes})")
