"""Reference outputs of the original, unmerged PyTorch model, saved beside the exported graphs.

`reference.npz` holds `input` (N, 3, H, W) float32 and one array per task. An
engine on a device is checked against these numbers, so they come from the
model as trained: unmerged, eval mode, fp32. The file is written byte for byte
the same for the same inputs (fixed zip timestamps), so manifests are stable.
"""

from __future__ import annotations

import copy
import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from export.artifacts.files import write_bytes_atomic
from export.errors import ExportError
from mtlora.merge import is_merged

REFERENCE_FILE = "reference.npz"
DEFAULT_SEED = 0


def default_inputs(model: torch.nn.Module, num_samples: int = 2, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Deterministic samples: uniform RGB noise in [0, 1], normalised with the model's mean / std."""
    if num_samples <= 0:
        raise ExportError(f"need at least one reference sample, got {num_samples}")
    config = model.config
    size = config.swin.img_size
    rng = np.random.default_rng(seed)
    rgb = rng.random((num_samples, config.swin.in_chans, size, size), dtype=np.float32)
    mean = np.asarray(config.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((rgb - mean) / std).astype(np.float32)


def compute_reference(model: torch.nn.Module, inputs: np.ndarray, tasks: Sequence[str] | None = None,
                      batch_size: int = 8) -> dict[str, np.ndarray]:
    """Run the unmerged model (eval, fp32) on `inputs`; returns `input` and one array per task."""
    if is_merged(model):
        raise ExportError("reference outputs must come from the unmerged model; pass the original checkpoint")
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    size = model.config.swin.img_size
    expected = (model.config.swin.in_chans, size, size)
    if inputs.ndim != 4 or inputs.shape[1:] != expected:
        raise ExportError(f"reference inputs must be (N, {', '.join(map(str, expected))}), got {inputs.shape}")
    tasks = tuple(model.tasks) if tasks is None else tuple(tasks)
    unknown = [t for t in tasks if t not in model.tasks]
    if unknown:
        raise ExportError(f"task(s) {', '.join(unknown)} not in the model; the model has: {', '.join(model.tasks)}")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                batch = torch.from_numpy(inputs[start:start + batch_size]).to(device)
                predictions = model.predict(batch)
                for t in tasks:
                    outputs[t].append(predictions[t].float().cpu().numpy())
    finally:
        model.train(was_training)
    return {"input": inputs, **{t: np.concatenate(v) for t, v in outputs.items()}}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive (readable by np.load) with fixed timestamps, so equal arrays give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def write_reference(model_unmerged: torch.nn.Module, out_dir: str | os.PathLike, inputs: np.ndarray | None = None,
                    tasks: Sequence[str] | None = None, num_samples: int = 2, seed: int = DEFAULT_SEED) -> Path:
    """Write `reference.npz` into `out_dir`: `input` and the unmerged model's output per task.

    Args:
        inputs: (N, 3, H, W) float32, already normalised; default: `num_samples` seeded samples.
        tasks: the tasks to record (default: all, in config order).
    """
    if inputs is None:
        inputs = default_inputs(model_unmerged, num_samples, seed)
    arrays = compute_reference(model_unmerged, inputs, tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(out_dir / REFERENCE_FILE, npz_bytes(arrays))
