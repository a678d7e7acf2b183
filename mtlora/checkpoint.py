"""Our checkpoint format: a directory with `model.safetensors` and `config.json`.

No pickle anywhere: weights are safetensors, the architecture and adapter
config is sorted JSON. A checkpoint directory is written beside its final name
and renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtlora.config import ModelConfig
from mtlora.errors import CheckpointError, ConfigError
from mtlora.fileio import commit_directory, staging_dir, write_json_atomic

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"  # merged flag and training metadata
# Everything a checkpoint directory holds (a training checkpoint adds its optimiser state, named in
# mtlora.train.run_directory): `save_checkpoint` replaces a directory holding only these, never a run's
# logs or someone's files beside them.
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE, "training_state.json", "training_state.safetensors")


def save_checkpoint(model: torch.nn.Module, out: str | Path, extra_state: dict[str, Any] | None = None) -> Path:
    """Write `model` (a MultiTaskSwin) as a checkpoint directory, atomically."""
    out = Path(out)
    staging = staging_dir(out, marker=CONFIG_FILE, what="checkpoint", only=CHECKPOINT_FILES)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "mtlora-export/1"})
        write_json_atomic(staging / CONFIG_FILE, model.config.to_dict())
        state = {"merged": bool(getattr(model, "merged", False)), **(extra_state or {})}
        write_json_atomic(staging / STATE_FILE, state)
        commit_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def resolve_checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir() or not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{path}: not an mtlora checkpoint (expected a directory with {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "for an official MTLoRA .pth run 'mtlora import-upstream' first"
        )
    return path


def read_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint directory or of a bare config JSON file."""
    path = Path(path)
    config_file = path if path.suffix == ".json" and path.is_file() else resolve_checkpoint_dir(path) / CONFIG_FILE
    try:
        return ModelConfig.from_json(config_file.read_text())
    except ConfigError as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: cannot read config ({err})") from None


def read_state(path: str | Path) -> dict[str, Any]:
    state_file = resolve_checkpoint_dir(path) / STATE_FILE
    if not state_file.is_file():
        return {}
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:  # ValueError: also undecodable bytes
        raise CheckpointError(f"{state_file}: corrupt checkpoint state ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file}: corrupt checkpoint state (not a JSON object)")
    return state


# safetensors element sizes by dtype name, to check a header's offsets against the shapes it states.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def weights_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from model.safetensors' header, checked against the file without reading
    the tensor data: a truncated, padded or garbled file is a CheckpointError."""
    import json
    import struct

    weights = resolve_checkpoint_dir(path) / WEIGHTS_FILE
    size = weights.stat().st_size
    try:
        with open(weights, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if not 2 <= length <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(fh.read(length))
        shapes, end = {}, 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, stop = entry["data_offsets"]
            expected = _DTYPE_BYTES[entry["dtype"]] * int(torch.tensor(entry["shape"], dtype=torch.int64).prod())
            if stop - start != expected or start < 0:
                raise ValueError(f"{name}: {stop - start} bytes for shape {entry['shape']} {entry['dtype']}")
            shapes[name] = tuple(entry["shape"])
            end = max(end, stop)
        if 8 + length + end != size:
            raise ValueError(f"the tensors end at byte {8 + length + end}, the file has {size}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise CheckpointError(f"{weights}: corrupt or truncated weights ({err})") from None
    return shapes


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    weights = resolve_checkpoint_dir(path) / WEIGHTS_FILE
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: corrupt or truncated weights ({err})") from None


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load with strict key and shape checks, turning mismatches into one clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source}: weights do not fit the model: {', '.join(parts)}")
    for key, value in state_dict.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: weights do not fit the model: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    check_values(state_dict, source, own)
    model.load_state_dict(state_dict, strict=True)


def check_values(state_dict: dict[str, torch.Tensor], source: str, own: dict[str, torch.Tensor]) -> None:
    """Every tensor of the kind the model holds there, and every weight finite.

    `load_state_dict` casts silently: integer or bool weights where the model has floats would load
    as whole numbers, and a float step counter where it has an integer would be truncated. A NaN or
    an infinity (a diverged run, a damaged file) would give NaN outputs with every command succeeding.
    """
    for key, value in state_dict.items():
        if value.is_floating_point() != own[key].is_floating_point() or value.is_complex():
            raise CheckpointError(
                f"{source}: {key} holds {str(value.dtype).removeprefix('torch.')} values where the model has "
                f"{str(own[key].dtype).removeprefix('torch.')}; the file was not written from this model"
            )
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointError(
                    f"{source}: {key} has {bad} NaN or Inf value(s) of {value.numel()}; the weights are damaged "
                    "or the training run diverged: use an earlier checkpoint"
                )


def load_checkpoint(path: str | Path, map_location: str = "cpu"):
    """Rebuild a MultiTaskSwin from a checkpoint directory (eval mode, fp32)."""
    from mtlora.model import MultiTaskSwin

    config = read_config(path)
    state = read_state(path)
    model = MultiTaskSwin(config)
    merged = state.get("merged", False)
    if not isinstance(merged, bool):
        raise CheckpointError(f"{resolve_checkpoint_dir(path) / STATE_FILE}: 'merged' is {json.dumps(merged)[:40]}, "
                              "not true or false; restore the file or save the checkpoint again")
    if merged:
        from mtlora.merge import mark_merged

        mark_merged(model)
    load_into(model, load_weights(path), str(path))
    return model.to(map_location).eval()
