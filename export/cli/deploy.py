"""`mtlora-export bundle` and `mtlora-export run`: carry a model to a device and run it there."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from export.artifacts.interface import MIN_IMAGE_SIDE
from export.cli.options import say, threads_option
from export.errors import ExportError

# OpenCV takes a camera index as a C int; real ones are small (/dev/videoN), and its older form, an index
# plus an API's offset (CAP_V4L2 = 200, ... CAP_OBSENSOR = 2600), stays far below this.
MAX_CAMERA_INDEX = 9999


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
    from export.pipeline.bundle import make_bundle

    directory, archive = make_bundle(build_dir, out, say, allow_failed=allow_failed)
    click.echo(f"bundle: {directory}\narchive: {archive}\nsee {directory}/README.md for the commands on the device")


def safe_stem(path: str) -> str:
    """A file name's stem fit to name an output file: no control characters, separators or leading dots."""
    stem = re.sub(r"[\x00-\x1f\x7f/\\]+", "_", Path(path).stem).lstrip(".")
    return stem or "image"


def unique_stems(paths) -> list[str]:
    """`safe_stem` of each path, numbered from the second of a repeated name (a/photo.jpg, b/photo.jpg).
    A number is never one that another image's own stem has (a/ok.png, b/ok.png, b/ok_2.png: ok, ok_3, ok_2)."""
    taken = {safe_stem(path) for path in paths}
    used: set[str] = set()
    stems = []
    for path in paths:
        stem = unique = safe_stem(path)
        number = 1
        while unique in used or (unique != stem and unique in taken):
            number += 1
            unique = f"{stem}_{number}"
        used.add(unique)
        stems.append(unique)
    return stems


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
@click.option("--image", "images", multiple=True, type=click.Path(),
              help="Image file to run (repeatable).")
@click.option("--video", type=click.Path(dir_okay=False),
              help="Video file to run frame by frame; --out names the overlay video (needs the `video` extra).")
@click.option("--camera", type=click.IntRange(min=0, max=MAX_CAMERA_INDEX),
              help="Camera index to run live until Ctrl-C or --max-frames; --out names the overlay video.")
@click.option("--out", type=click.Path(),
              help="Images: per-task outputs as .npz, a PNG per task and image beside it "
                   "[default: prediction.npz]. Video and camera: the overlay video (.mp4 or .avi).")
@click.option("--tasks", help="Comma-separated tasks to run (default: all). A split engine set runs only "
                              "their heads; a single graph runs whole (choose its tasks with `build --tasks`).")
@click.option("--max-frames", type=click.IntRange(min=1), help="Stop a video or camera after this many frames.")
@threads_option
def run(engine: str, images: tuple[str, ...], video: str | None, camera: int | None, out: str | None,
        tasks: str | None, max_frames: int | None, threads: int | None) -> None:
    """Run ENGINE (an engine directory of a build) on images, a video or a camera."""
    from export.artifacts.engineset import open_engine

    sources = [name for name, given in (("--image", images), ("--video", video), ("--camera", camera is not None))
               if given]
    if len(sources) != 1:
        raise click.UsageError("give one of --image, --video or --camera" if not sources
                               else f"{' and '.join(sources)} cannot be combined; give one of them")
    if images and max_frames is not None:
        raise click.BadParameter("is for --video and --camera", param_hint="--max-frames")
    if out is not None and not out.strip():
        raise click.BadParameter("is empty; name the output file, e.g. --out "
                                 + ("prediction.npz" if images else "overlay.mp4"), param_hint="--out")
    if video is not None and out is not None and _same_file(video, out):
        raise click.BadParameter(f"{out} is the input video; name another file for the overlay, e.g. "
                                 "--out overlay.mp4", param_hint="--out")
    if threads is None and not images:
        from export.video.pipeline import video_engine_threads

        threads = video_engine_threads()  # a core left to decoding, drawing and encoding
    model = open_engine(engine, threads)
    try:
        chosen = model.choose_tasks(tasks)
    except ExportError as err:  # a flag naming what the engine lacks: a usage error, as click's own (exit 2)
        raise click.BadParameter(str(err), param_hint="--tasks") from None
    if tasks is not None and not model.runs_chosen_tasks_only:
        say(f"[run] {model.entry.key} is one graph: all its tasks run and only {', '.join(chosen)} are kept; "
            "to run fewer, build with `build --tasks` or `--layout split`")
    if images:
        _run_images(model, images, out or "prediction.npz", chosen)
    else:
        _run_video(model, video, camera, out, chosen, max_frames, threads)


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same path spelt otherwise, a symbolic or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): only the same path, resolved, can be the same file
        return Path(a).resolve() == Path(b).resolve()


def _run_images(model, images: tuple[str, ...], out: str, tasks: tuple[str, ...]) -> None:
    import io

    import numpy as np
    from PIL import Image

    from export.artifacts.outputs import OutputSet
    from export.checking.visualize import render_output

    out_path = Path(out)
    if out_path.suffix != ".npz":
        raise click.BadParameter("must end in .npz", param_hint="--out")
    batch = np.stack([model.interface.preprocess(_load(p, model.interface.size)) for p in images])
    with model:
        outputs = model.infer(batch, tasks)
        seconds = model.last_seconds or float("nan")
    # Every file is staged first and published together: a failed write leaves none of them.
    staged = OutputSet(out_path.parent)
    try:
        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        staged.write(out_path.name, buffer.getvalue())
        for i, stem in enumerate(unique_stems(images)):
            for task, value in outputs.items():
                png = io.BytesIO()
                Image.fromarray(render_output(task, value[i], model.interface.kind(task))).save(png, format="PNG")
                staged.write(f"{out_path.stem}_{stem}_{task}.png", png.getvalue())
        staged.publish()
    except BaseException:  # Ctrl-C or a failure while staging: no staging directory stays behind
        staged.discard()
        raise
    shapes = ", ".join(f"{t} {tuple(v.shape)}" for t, v in outputs.items())
    click.echo(f"{model.entry.key}: {len(images)} image(s) in {1000 * seconds:.1f} ms -> {out_path} ({shapes})")


def _run_video(model, video: str | None, camera: int | None, out: str | None, tasks: tuple[str, ...],
               max_frames: int | None, threads: int) -> None:
    from export.video.frames import CODECS, FrameSource
    from export.video.pipeline import video_to_file

    if out is None:
        raise click.BadParameter("name the overlay video to write, e.g. --out overlay.mp4", param_hint="--out")
    if Path(out).suffix.lower() not in CODECS:
        raise click.BadParameter(f"a video needs one of the suffixes {', '.join(CODECS)}", param_hint="--out")
    source = FrameSource.video(video) if video is not None else FrameSource.camera(camera)
    with model:
        result, written = video_to_file(model, source, out, tasks, max_frames=max_frames, say=say)
    stopped = " (stopped with Ctrl-C)" if result.interrupted else ""
    click.echo(f"{model.entry.key} ({threads} engine thread(s)) on {source.name}: {result.summary()}{stopped} "
               f"-> {written} (input | {' | '.join(tasks)})")
