"""Calibration data: a sized, re-iterable stream of feed dicts ``{input name: float32 array (B, ...)}``.

Every backend adapts the same object (ONNX Runtime CalibrationDataReader, nncf.Dataset). Images are
read and preprocessed one batch at a time, never all at once. Preprocessing is injected as a callable
``preprocess(path) -> float32 (3, h, w)`` so that calibration uses exactly the deployment's
preprocessing (the canonical one lives with the model, and this package must not import it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import CalibrationError
from calibration.progress import with_progress
from mtlora_base.numbers import count_non_finite

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Fewer samples than this give activation ranges that swing with every image; allowed on request only.
MIN_SAMPLES = 8

Feed = dict[str, np.ndarray]
Preprocess = Callable[[Path], np.ndarray]


class CalibrationSet:
    """Calibration feeds. Build one with `from_images`, `from_arrays`, `from_source` (streamed) or `from_feeds`."""

    def __init__(
        self,
        *,
        kind: str,
        num_samples: int,
        num_feeds: int,
        iterate: Callable[[], Iterator[Feed]],
        digest_items: Callable[[], Iterator[bytes]],
        settings: Mapping[str, Any],
        input_names: Sequence[str],
        digest_chunks_per_sample: int | None = None,
    ):
        self.kind = kind
        self.num_samples = num_samples
        self.input_names = tuple(input_names)
        self.settings = dict(settings)
        self._num_feeds = num_feeds
        self._iterate = iterate
        self._digest_items = digest_items
        self._fingerprint: str | None = None
        # Progress lines for long passes (`calibration.progress`): set by whoever shows them, e.g. the build.
        self.progress: Callable[[str], None] | None = None
        self._digest_chunks_per_sample = digest_chunks_per_sample  # None: unknown, so no time estimate

    def __len__(self) -> int:
        """Number of feeds (batches) one pass yields."""
        return self._num_feeds

    def __iter__(self) -> Iterator[Feed]:
        return with_progress(self._iterate(), total=self._num_feeds, what="calibration pass", say=self.progress)

    def __repr__(self) -> str:
        return f"CalibrationSet({self.kind}, {self.num_samples} samples in {len(self)} feeds, inputs={list(self.input_names)})"

    def fingerprint(self) -> str:
        """SHA-256 over the samples' bytes in order and the settings; stable across runs and machines."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(json.dumps({"kind": self.kind, **self.settings}, sort_keys=True, default=str).encode())
            per_sample = self._digest_chunks_per_sample
            chunks = with_progress(self._digest_items(), total=self.num_samples if per_sample else None,
                                   per_unit=per_sample or 1, what="reading the samples to fingerprint them",
                                   say=self.progress)
            for chunk in chunks:
                digest.update(hashlib.sha256(chunk).digest())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------------------- constructors
    @classmethod
    def from_images(
        cls,
        paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        preprocess: Preprocess,
        input_name: str = "image",
        size: tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        limit: int | None = None,
        batch_size: int = 1,
        min_samples: int = MIN_SAMPLES,
        recursive: bool = True,
    ) -> CalibrationSet:
        """Images from a directory (sorted; sub-directories too when `recursive`) or a list of paths.

        `preprocess(path)` must return float32 (3, h, w). `size` (h, w) is checked against every sample;
        `size`, `mean` and `std` describe the preprocessing and go into the fingerprint, since a callable
        cannot be hashed. `limit` keeps that many images spread evenly over the sorted list.
        """
        if not callable(preprocess):
            raise CalibrationError("from_images needs preprocess=callable(path) -> float32 (3, h, w)")
        paths = _image_paths(paths_or_dir, recursive=recursive)
        paths = _spread(paths, limit)
        _check_count(len(paths), min_samples, f"images in {_describe_source(paths_or_dir)}")
        batch_size = _check_batch_size(batch_size)
        expected = (3, *size) if size is not None else None
        batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]

        def load(path: Path) -> np.ndarray:
            try:
                sample = preprocess(path)
            except Exception as exc:
                raise CalibrationError(f"could not preprocess calibration image {path}: {exc}") from exc
            return _check_sample(sample, expected, f"preprocess({path.name})")

        def iterate() -> Iterator[Feed]:
            for batch in batches:
                yield {input_name: np.stack([load(p) for p in batch])}

        def digest_items() -> Iterator[bytes]:
            for path in paths:
                yield path.read_bytes()

        settings = {
            "input_name": input_name,
            "size": list(size) if size is not None else None,
            "mean": [float(v) for v in mean] if mean is not None else None,
            "std": [float(v) for v in std] if std is not None else None,
            "batch_size": batch_size,
            "preprocess": _callable_id(preprocess),
        }
        return cls(
            kind="images",
            num_samples=len(paths),
            num_feeds=len(batches),
            iterate=iterate,
            digest_items=digest_items,
            settings=settings,
            input_names=[input_name],
            digest_chunks_per_sample=1,
        )

    @classmethod
    def from_arrays(
        cls,
        arrays: np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray],
        *,
        input_name: str = "image",
        batch_size: int = 1,
        min_samples: int = MIN_SAMPLES,
    ) -> CalibrationSet:
        """Samples already in memory: an (N, ...) array, a list of per-sample arrays, or
        ``{input name: (N, ...)}`` for models with several inputs (e.g. a split-layout head)."""
        if isinstance(arrays, Mapping):
            columns = {str(k): np.asarray(v) for k, v in arrays.items()}
        elif isinstance(arrays, np.ndarray):
            columns = {input_name: arrays}
        else:
            samples = list(arrays)
            if not samples:
                raise CalibrationError("from_arrays got no samples")
            try:
                columns = {input_name: np.stack([np.asarray(s) for s in samples])}
            except ValueError as exc:
                raise CalibrationError(f"calibration samples differ in shape: {exc}") from exc
        if not columns:
            raise CalibrationError("from_arrays got an empty mapping of inputs")
        counts = {name: (a.shape[0] if a.ndim else 0) for name, a in columns.items()}
        if len(set(counts.values())) != 1:
            raise CalibrationError(f"calibration inputs hold different numbers of samples: {counts}")
        for name, a in columns.items():
            if a.dtype != np.float32:
                raise CalibrationError(f"calibration input '{name}' is {a.dtype}; convert it to float32")
            _check_finite(a, f"calibration input '{name}'")
        n = next(iter(counts.values()))
        _check_count(n, min_samples, "calibration samples")
        batch_size = _check_batch_size(batch_size)

        def iterate() -> Iterator[Feed]:
            for i in range(0, n, batch_size):
                yield {name: np.ascontiguousarray(a[i : i + batch_size]) for name, a in columns.items()}

        def digest_items() -> Iterator[bytes]:
            for name, a in columns.items():
                yield from _array_digest_items(name, a)

        return cls(
            kind="arrays",
            num_samples=n,
            num_feeds=-(-n // batch_size),
            iterate=iterate,
            digest_items=digest_items,
            settings={"batch_size": batch_size},
            input_names=list(columns),
        )

    @classmethod
    def from_source(
        cls,
        iterate: Callable[[], Iterator[Mapping[str, np.ndarray]]],
        *,
        num_samples: int,
        input_names: Sequence[str],
        settings: Mapping[str, Any] | None = None,
        digest_items: Callable[[], Iterator[bytes]] | None = None,
        min_samples: int = MIN_SAMPLES,
    ) -> CalibrationSet:
        """A streaming set: `iterate()` starts a fresh pass and yields one feed (batch of 1) at a time,
        so nothing is held in memory however many samples there are. It must yield `num_samples` feeds,
        the same ones on every pass. `digest_items` defaults to hashing the feeds themselves."""
        if not callable(iterate):
            raise CalibrationError("from_source needs iterate=callable() -> iterator of feed dicts")
        _check_count(num_samples, min_samples, "calibration samples")
        names = list(input_names)

        def checked() -> Iterator[Feed]:
            for i, feed in enumerate(iterate()):
                if not isinstance(feed, Mapping) or list(feed) != names:
                    got = list(feed) if isinstance(feed, Mapping) else type(feed).__name__
                    raise CalibrationError(f"calibration feed {i} has inputs {got}, expected {names}")
                _check_float32(i, feed)
                yield dict(feed)

        def feed_bytes() -> Iterator[bytes]:
            for feed in checked():
                for name, a in feed.items():
                    yield from _array_digest_items(name, a)

        return cls(
            kind="stream",
            num_samples=num_samples,
            num_feeds=num_samples,
            iterate=checked,
            digest_items=digest_items or feed_bytes,
            settings=dict(settings or {}),
            input_names=names,
            digest_chunks_per_sample=None if digest_items else 2 * len(names),  # a header and the bytes per input
        )

    @classmethod
    def from_feeds(cls, feeds: Iterable[Mapping[str, np.ndarray]], *, min_samples: int = MIN_SAMPLES) -> CalibrationSet:
        """Any iterable of feed dicts. A one-shot iterator (a generator) is read into memory once so
        that the set can be iterated again; pass a list to avoid the copy."""
        items = feeds if isinstance(feeds, Sequence) else list(feeds)
        if not items:
            raise CalibrationError("from_feeds got no feeds")
        names = None
        for i, feed in enumerate(items):
            if not isinstance(feed, Mapping) or not feed:
                raise CalibrationError(f"calibration feed {i} is not a non-empty dict of input name -> array")
            if names is None:
                names = list(feed)
            elif list(feed) != names:
                raise CalibrationError(f"calibration feed {i} has inputs {list(feed)}, feed 0 has {names}")
            _check_float32(i, feed)
        _check_count(len(items), min_samples, "calibration feeds")

        def iterate() -> Iterator[Feed]:
            for feed in items:
                yield dict(feed)

        def digest_items() -> Iterator[bytes]:
            for feed in items:
                for name, a in feed.items():
                    yield from _array_digest_items(name, a)

        return cls(
            kind="feeds",
            num_samples=len(items),
            num_feeds=len(items),
            iterate=iterate,
            digest_items=digest_items,
            settings={},
            input_names=names or [],
        )


def as_calibration_set(data: CalibrationSet | Iterable[Mapping[str, np.ndarray]], *, min_samples: int = MIN_SAMPLES) -> CalibrationSet:
    """Accept a CalibrationSet or any iterable of feed dicts (the backends' common currency)."""
    if isinstance(data, CalibrationSet):
        return data
    if data is None:
        raise CalibrationError("int8 needs calibration data: pass a CalibrationSet or a list of feed dicts")
    return CalibrationSet.from_feeds(data, min_samples=min_samples)


def calibration_for(model, data: CalibrationSet | Iterable[Mapping[str, np.ndarray]]) -> CalibrationSet:
    """`as_calibration_set`, checked to feed exactly the inputs of the ONNX `model`."""
    from engines.artifact import onnx_io_metadata

    calibration = as_calibration_set(data)
    inputs, _ = onnx_io_metadata(model)
    if set(calibration.input_names) != {m.name for m in inputs}:
        raise CalibrationError(
            f"calibration feeds name inputs {list(calibration.input_names)}, the model takes {[m.name for m in inputs]}"
        )
    return calibration


# ----------------------------------------------------------------------------- helpers


def _check_float32(i: int, feed: Mapping[str, Any]) -> None:
    for name, a in feed.items():
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            raise CalibrationError(f"calibration feed {i}, input '{name}': expected a float32 numpy array")
        _check_finite(a, f"calibration feed {i}, input '{name}'")


def _check_finite(a: np.ndarray, where: str) -> None:
    """A NaN or infinity makes an activation range meaningless (and the calibrators fail deep inside with
    'range ... is not finite'): refused here, with how many there are and in which samples."""
    finite = np.isfinite(a)
    if finite.all():
        return
    bad = count_non_finite(a)
    samples = np.flatnonzero(~finite.reshape(len(a), -1).all(axis=1)) if a.ndim else np.array([0])
    listed = ", ".join(map(str, samples[:5])) + (", ..." if len(samples) > 5 else "")
    raise CalibrationError(f"{where} holds non-finite values ({bad} of {a.size}) in sample(s) {listed}; "
                           "calibration data must be finite numbers")


def _array_digest_items(name: str, a: np.ndarray) -> Iterator[bytes]:
    """What identifies one named input array in a calibration fingerprint: name, dtype, shape and bytes."""
    yield f"{name}:{a.dtype.str}:{a.shape}".encode()
    yield np.ascontiguousarray(a).tobytes()


def _image_paths(paths_or_dir, *, recursive: bool) -> list[Path]:
    if isinstance(paths_or_dir, (str, os.PathLike)):
        root = Path(paths_or_dir)
        if not root.exists():
            raise CalibrationError(f"calibration path {root} does not exist")
        if root.is_file():
            candidates = [root]
        else:
            candidates = sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file())
            if not candidates:
                raise CalibrationError(f"calibration directory {root} is empty; put calibration images in it")
    else:
        candidates = [Path(p) for p in paths_or_dir]
        if not candidates:
            raise CalibrationError("the list of calibration images is empty")
        missing = [str(p) for p in candidates if not p.is_file()]
        if missing:
            raise CalibrationError(f"calibration images not found: {', '.join(missing[:3])}")
    images = [p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise CalibrationError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {_describe_source(paths_or_dir)}"
        )
    return images


def _spread(paths: list[Path], limit: int | None) -> list[Path]:
    """Keep `limit` paths spread evenly over the sorted list (the first N would often be one class)."""
    if limit is None or limit >= len(paths):
        return paths
    if limit < 1:
        raise CalibrationError(f"limit must be at least 1, got {limit}")
    index = np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))
    return [paths[i] for i in index]


def _check_count(count: int, min_samples: int, what: str) -> None:
    if count == 0:
        raise CalibrationError(f"no {what}")
    if count < min_samples:
        raise CalibrationError(
            f"only {count} {what}; at least {min_samples} are needed for stable int8 ranges "
            f"(add samples, or pass min_samples={count} to accept fewer)"
        )


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise CalibrationError(f"batch_size must be at least 1, got {batch_size}")
    return int(batch_size)


def _check_sample(sample, expected: tuple[int, ...] | None, where: str) -> np.ndarray:
    if not isinstance(sample, np.ndarray):
        raise CalibrationError(f"{where} returned {type(sample).__name__}, expected a float32 numpy array (3, h, w)")
    if sample.dtype != np.float32:
        raise CalibrationError(f"{where} returned dtype {sample.dtype}, expected float32")
    if sample.ndim != 3 or sample.shape[0] != 3 or (expected is not None and sample.shape != expected):
        want = expected if expected is not None else "(3, h, w)"
        raise CalibrationError(f"{where} returned shape {sample.shape}, expected {want}")
    _check_finite(sample[None], where)
    return sample


def _describe_source(paths_or_dir) -> str:
    if isinstance(paths_or_dir, (str, os.PathLike)):
        return str(paths_or_dir)
    return "the given list of paths"


def _callable_id(func: Callable) -> str:
    """A stable name for a callable (functools.partial keeps its bound arguments in the name)."""
    if isinstance(func, functools.partial):
        args = ", ".join([*map(repr, func.args), *(f"{k}={v!r}" for k, v in sorted(func.keywords.items()))])
        return f"partial({_callable_id(func.func)}, {args})"
    module = getattr(func, "__module__", None) or type(func).__module__
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}.{name}"
