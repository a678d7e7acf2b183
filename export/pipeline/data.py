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

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}


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
        return limit
    source, _ = _source(spec, default_split, [], 0, limit)
    return min(limit, len(source))


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
