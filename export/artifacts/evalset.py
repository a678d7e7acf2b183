"""`evalset.npz`: a small labelled evaluation sample with the PyTorch references for it.

A device without PyTorch checks its engines against these numbers. Arrays:
`input` (N, 3, H, W) float32 normalised, `ref_<task>` (N, C, H, W) from the
original model, and `label_<task>` where labels were known. Read without pickle.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.artifacts.files import write_bytes_atomic
from export.errors import ExportError
from mtlora_base.numbers import count_non_finite


def read_npz(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz, read without pickle: a corrupt, truncated or pickled file is one ExportError."""
    from mtlora.data.preprocess import NPZ_READ_ERRORS, open_npz

    try:
        with open_npz(path) as data:
            return {k: data[k] for k in data.files}
    except NPZ_READ_ERRORS as err:
        raise ExportError(f"{path}: not a readable {what} ({err})") from None


def check_numbers(path, arrays: Mapping[str, np.ndarray], finite: tuple[str, ...]) -> None:
    """Every array must hold numbers (not strings or objects), and those named in `finite` (by name, or by
    prefix ending in '_') finite ones: a NaN input or reference would make every comparison quietly false."""
    for name, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise ExportError(f"{path}: array '{name}' holds {a.dtype} values, not numbers; rebuild the file")
        must_be_finite = any(name == f or (f.endswith("_") and name.startswith(f)) for f in finite)
        bad = count_non_finite(a) if must_be_finite else ""
        if bad:
            raise ExportError(f"{path}: array '{name}' holds non-finite values ({bad} of {a.size}); "
                              "inputs and references must be finite numbers")


@dataclass
class EvalSet:
    images: np.ndarray
    references: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, tasks) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """(images, references of `tasks`, labels) per batch; a task without stored references is an error."""
        missing = [t for t in tasks if t not in self.references]
        if missing:
            raise ExportError(f"the evaluation set has no references for {', '.join(missing)}; rebuild it")
        for i in range(0, len(self.images), batch_size):
            sl = slice(i, i + batch_size)
            yield (self.images[sl].astype(np.float32), {t: self.references[t][sl] for t in tasks},
                   {t: v[sl] for t, v in self.labels.items()})

    def write(self, path: str | Path) -> Path:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, input=self.images, **{f"ref_{t}": v for t, v in self.references.items()},
                            **{f"label_{t}": v for t, v in self.labels.items()})
        return write_bytes_atomic(path, buffer.getvalue())

    @classmethod
    def read(cls, path: str | Path) -> EvalSet:
        data = read_npz(path, "evaluation set")
        if "input" not in data:
            raise ExportError(f"{path}: not a readable evaluation set (no 'input' array)")
        check_numbers(path, data, finite=("input", "ref_"))  # labels may mark unknown depth with NaN
        return cls(data["input"], {k[4:]: v for k, v in data.items() if k.startswith("ref_")},
                   {k[6:]: v for k, v in data.items() if k.startswith("label_")})

    @classmethod
    def collect(cls, images: list[np.ndarray], references: Mapping[str, list[np.ndarray]],
                labels: Mapping[str, list[np.ndarray]]) -> EvalSet:
        """From per-batch pieces; a task labelled in only some batches keeps no labels."""
        return cls(np.concatenate(images), {t: np.concatenate(v) for t, v in references.items()},
                   {t: np.concatenate(v) for t, v in labels.items() if len(v) == len(images)})
