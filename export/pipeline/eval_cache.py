"""The evaluation batches of one build, computed once and kept on disk, not in memory.

A build checks its engines once; the INT8 fallback search and `--precision auto` check them (and
their variants) many times over. The references come from the original PyTorch model, which is
too slow to run again each time, and at 448x448 four tasks' references take 26 MB an image, too much
to hold for a whole evaluation set. So the first pass streams the batches from `eval_batches` and
writes each one (inputs, references, labels) to an uncompressed .npz in a folder of the build
directory; later passes read them back one at a time. The folder goes when the build ends.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from export.artifacts.builddir import BuildDir
from export.artifacts.evalset import read_npz
from export.checking.accuracy import EvalBatch


class EvalBatchCache:
    """Re-iterable evaluation batches: `iter()` streams (first pass) or reads back; `[i]` / `[a:b]` index them."""

    def __init__(self, make: Callable[[], Iterable[EvalBatch]], work_dir: Path):
        self._make = make
        self._work_dir = Path(work_dir)
        self._folder: Path | None = None
        self._count: int | None = None  # known once a first pass has finished

    def _path(self, index: int) -> Path:
        return self._folder / f"{index:05d}.npz"

    def _save(self, index: int, batch: EvalBatch) -> None:
        arrays = {"image": batch.image, **{f"ref_{t}": v for t, v in batch.reference.items()},
                  **{f"label_{t}": v for t, v in (batch.labels or {}).items()}}
        np.savez(self._path(index), **arrays)

    def _load(self, index: int) -> EvalBatch:
        data = read_npz(self._path(index), "cached evaluation batch")
        labels = {k[6:]: v for k, v in data.items() if k.startswith("label_")}
        return EvalBatch(data["image"], {k[4:]: v for k, v in data.items() if k.startswith("ref_")}, labels or None)

    def __iter__(self) -> Iterator[EvalBatch]:
        if self._count is not None:
            for index in range(self._count):
                yield self._load(index)
            return
        self.close()
        self._folder = Path(tempfile.mkdtemp(prefix=BuildDir.EVAL_BATCHES_PREFIX, dir=self._work_dir))
        count = 0
        for batch in self._make():
            self._save(count, batch)
            count += 1
            yield batch
        self._count = count

    def _ensure(self) -> None:
        if self._count is None:
            for _ in self:
                pass

    def __len__(self) -> int:
        self._ensure()
        return self._count

    def __getitem__(self, item):
        self._ensure()
        if isinstance(item, slice):
            return [self._load(i) for i in range(self._count)[item]]
        return self._load(range(self._count)[item])

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder, self._count = None, None
