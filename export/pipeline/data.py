"""Evaluation and calibration data named on the command line, streamed as numpy (no torch).

A data spec is one of:

- `synthetic[:SPLIT]`          the procedural data set (default split: val for evaluation, train for calibration)
- `pascal:ROOT[:SPLIT]`        PASCAL-Context multi-task in the PASCAL_MT layout
- `nyud:ROOT[:SPLIT]`          NYUD-v2 multi-task
- a directory of images        images only, no labels
- `evalset.npz`                an evaluation sample written by `build` (inputs, labels, references)

Images are preprocessed exactly as at inference (`mtlora.data.preprocess`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.artifacts.evalset import EvalSet
from export.errors import ExportError
from mtlora.data.preprocess import load_image, preprocess
from mtlora.data.transforms import ValTransform
from mtlora.errors import MTLoRAError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}
# Normalised images hold values of a few units either side of zero; far beyond this an .npz holds raw or
# broken data, which would set int8 ranges wrongly (or fail inside the calibrator's histogram).
MAX_ABS_INPUT = 1e3


@dataclass(frozen=True)
class DataSpec:
    kind: str  # synthetic | pascal | nyud | images | evalset
    root: Path | None = None
    split: str | None = None

    def describe(self) -> str:
        where = f" {self.root}" if self.root else ""
        split = f" ({self.split})" if self.split else ""
        return f"{self.kind}{where}{split}"


def parse_spec(spec: str) -> DataSpec:
    if not spec:
        raise ExportError("empty data spec; give synthetic, pascal:ROOT, nyud:ROOT or an image directory")
    head, _, rest = spec.partition(":")
    if head == "synthetic":
        return DataSpec("synthetic", split=rest or None)
    if head in ("pascal", "nyud"):
        if not rest:
            raise ExportError(f"'{spec}': {head} needs its data root, e.g. {head}:/data/{head.upper()}")
        root, _, split = rest.rpartition(":") if rest.count(":") and not Path(rest).exists() else (rest, "", "")
        return DataSpec(head, Path(root), split or None)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ExportError(f"{path}: no such evaluation set file")
        return DataSpec("evalset", path)
    if path.is_dir():
        return DataSpec("images", path)
    if path.exists():
        raise ExportError(f"{path}: not a directory of images, a data set spec or an evalset .npz")
    raise ExportError(f"'{spec}': no such directory; give synthetic, pascal:ROOT, nyud:ROOT or an image directory")


def image_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"{directory}: contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _source(spec: DataSpec, default_split: str, tasks: list[str], size: int, count: int):
    """The underlying sample source: `len()` and `[i] -> dict` of numpy arrays."""
    split = spec.split or default_split
    if spec.kind == "synthetic":
        from mtlora.data.synthetic import SYNTHETIC_TASKS, SyntheticMultiTask

        return SyntheticMultiTask(split=split, num_samples=count, size=size,
                                  tasks=[t for t in tasks if t in SYNTHETIC_TASKS]), SYNTHETIC_TASKS
    if spec.kind == "pascal":
        from mtlora.data.pascal import PASCAL_TASKS, PascalContextMT

        return PascalContextMT(spec.root, split=split, tasks=[t for t in tasks if t in PASCAL_TASKS]), PASCAL_TASKS
    from mtlora.data.nyud import NYUD_TASKS, NYUDMT

    return NYUDMT(spec.root, split=split, tasks=[t for t in tasks if t in NYUD_TASKS]), NYUD_TASKS


def count_samples(spec: DataSpec, *, limit: int, default_split: str) -> int:
    """How many samples `iter_samples(spec, limit=limit, ...)` yields, without reading any of them."""
    if spec.kind == "images":
        return min(limit, len(image_files(spec.root)))
    if spec.kind == "evalset":
        return min(limit, len(EvalSet.read(spec.root)))
    if spec.kind == "synthetic":
        _source(spec, default_split, [], 64, limit)  # an unknown split is refused here, not mid-build
        return limit
    source, _ = _source(spec, default_split, [], 0, limit)
    return min(limit, len(source))


def check_images(images: np.ndarray, where: str, size: int | None) -> None:
    """An .npz's `input` array must be what the model takes: preprocessed float images (N, 3, size, size),
    normalised as at inference. Integer pixels would be silently cast and calibrate wrongly."""
    want = f"(N, 3, {size}, {size})" if size else "(N, 3, H, W)"
    if images.dtype.kind != "f":
        raise ExportError(f"{where}: array 'input' holds {images.dtype} values; the .npz must hold preprocessed "
                          f"float images {want}, normalised as at inference (or pass a directory of images instead)")
    if images.ndim != 4 or images.shape[1] != 3 or (size and images.shape[2:] != (size, size)):
        raise ExportError(f"{where}: array 'input' has shape {images.shape}; the model takes {want} images")
    if len(images) == 0:
        raise ExportError(f"{where}: array 'input' holds no images; give a data set with some")
    if not np.isfinite(images).all():  # EvalSet.read refuses them too; an array from elsewhere may hold them
        raise ExportError(f"{where}: array 'input' holds non-finite values; images must be finite numbers")
    peak = float(np.abs(images).max())
    if peak > MAX_ABS_INPUT:
        raise ExportError(f"{where}: array 'input' holds values up to {peak:.3g}, far outside normalised images "
                          f"(|x| <= {MAX_ABS_INPUT:g}); write the .npz from preprocessed images")


def check_data(text: str, option: str, *, limit: int, default_split: str, size: int | None,
               all_readable: bool) -> int:
    """Refuse `option`'s data before any work: an empty value, a bad split or root, an .npz the model cannot
    take, no samples. With `all_readable` (evaluation reads every image it uses, skipping none) each of
    the first `limit` images of a directory must read. Returns the samples available, up to `limit`."""
    if not text.strip():
        raise ExportError(f"{option} is empty; give synthetic, pascal:ROOT, nyud:ROOT, an image directory "
                          "or an .npz, or leave the option out")
    spec = parse_spec(text)
    if spec.kind == "evalset":
        check_images(EvalSet.read(spec.root).images, f"{option} {spec.root}", size)
    try:
        count = count_samples(spec, limit=limit, default_split=default_split)
    except MTLoRAError as err:  # a bad split or data root, an empty directory: say which option named it
        raise ExportError(f"{option}: {err}") from None
    if count == 0:
        raise ExportError(f"{option} {text}: holds no samples; give a data set with some")
    if all_readable and spec.kind == "images":
        for path in image_files(spec.root)[:limit]:
            try:
                load_image(path)
            except MTLoRAError as err:  # load_image's one-line reasons: empty, truncated, not an image
                raise ExportError(f"{option} {text}: {err}") from None
    return count


def check_data_options(opts, model_size=None) -> None:
    """`--eval-data` and `--calib-data` of a build (`BuildOptions`), checked before anything is exported.

    `model_size(opts)` gives the input size an .npz must have (asked only when one is named); by default
    the size the export will have (a check passes the size its build's export has)."""
    specs = [t for t in (opts.eval_data, opts.calib_data) if t is not None]
    needs_size = any(t.strip() and parse_spec(t).kind == "evalset" for t in specs)
    size = (model_size or _model_size)(opts) if needs_size else None
    if opts.eval_data is not None:
        check_data(opts.eval_data, "--eval-data", limit=opts.eval_samples, default_split="val", size=size,
                   all_readable=True)
    if opts.calib_data is not None:
        check_data(opts.calib_data, "--calib-data", limit=opts.calib_samples, default_split="train", size=size,
                   all_readable=False)  # calibration skips unreadable images (calibration_step.own_images)


def _model_size(opts) -> int | None:
    """The input size the export will have: only an .npz needs it, so only then is the model loaded early."""
    if opts.img_size:
        return opts.img_size
    if opts.from_bundle:
        return None  # the bundle's graphs are read later; the shape is then checked without the size
    from export.pipeline.original_model import torch_available
    from export.pipeline.sources import resolve_model

    if not torch_available():
        return None
    return resolve_model(opts.checkpoint, opts.img_size).model().config.swin.img_size


@dataclass
class Sample:
    image: np.ndarray  # (3, H, W) float32, normalised
    labels: dict[str, np.ndarray]  # task -> label in model layout; empty when unlabelled
    name: str


def iter_samples(
    spec: DataSpec,
    *,
    task_channels: Mapping[str, int],
    size: int,
    mean,
    std,
    limit: int,
    default_split: str = "val",
) -> Iterator[Sample]:
    """Up to `limit` samples, one at a time (memory stays flat however many there are).

    Labels are kept only for tasks whose class count matches the model's: a model
    with 21 PASCAL classes evaluated on synthetic scenes gets no semseg labels.
    """
    if limit <= 0:
        raise ExportError(f"sample count must be positive, got {limit}")
    if spec.kind == "images":
        for path in image_files(spec.root)[:limit]:
            yield Sample(preprocess(load_image(path), size=(size, size), mean=mean, std=std), {}, path.name)
        return
    if spec.kind == "evalset":
        raise ExportError("an evalset .npz carries its own references; read it with EvalSet.read")
    source, dataset_tasks = _source(spec, default_split, list(task_channels), size, limit)
    if len(source) == 0:
        raise ExportError(f"{spec.describe()}: the split is empty")
    transform = ValTransform((size, size), tuple(mean), tuple(std))
    usable = [t for t, c in task_channels.items() if dataset_tasks.get(t) == c]
    for index in range(min(limit, len(source))):
        raw = source[index]
        sample = transform(raw)
        labels = {t: sample[t] for t in usable if t in sample}
        name = str(raw.get("meta", {}).get("id", index)) if isinstance(raw.get("meta"), dict) else str(index)
        yield Sample(sample["image"], labels, name)


def batched(samples: Iterator[Sample], batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], list[str]]]:
    """Stack samples into (N, 3, H, W) batches with their labels (only tasks every sample has)."""
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield _stack(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk)


def _stack(chunk: list[Sample]):
    images = np.stack([s.image for s in chunk]).astype(np.float32)
    common = set.intersection(*(set(s.labels) for s in chunk)) if chunk else set()
    labels = {t: np.stack([s.labels[t] for s in chunk]) for t in sorted(common)}
    return images, labels, [s.name for s in chunk]
