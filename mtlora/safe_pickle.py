"""Read PyTorch zip checkpoints with an allow-listed unpickler.

Official MTLoRA checkpoints carry a pickled `yacs.config.CfgNode`, which
`torch.load(weights_only=True)` refuses. We never fall back to
`weights_only=False` for a file a user hands us: this unpickler knows how to
rebuild tensors, plain containers and a CfgNode (as a plain dict), and refuses
every other global before anything is constructed.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlora.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ConfigNode(dict):
    """Stand-in for `yacs.config.CfgNode`: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __setstate__(self, state: dict) -> None:
        # CfgNode pickles its flags (__immutable__, __new_allowed__, ...) as instance state;
        # they mean nothing to us.
        pass


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, *_args) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, *_args) -> torch.Tensor:
    return data


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
    ("yacs.config", "CfgNode"): ConfigNode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._source}: refused to load: it contains a pickled '{module}.{name}', which is not "
                "a tensor, a plain container or an MTLoRA config; only checkpoints written by MTLoRA/PyTorch "
                "training code are accepted"
            ) from None

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unsupported persistent object in checkpoint")
        storage_type, key = pid[1], str(pid[2])
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
        if dtype is None:
            raise CheckpointError(f"{self._source}: unsupported storage type in checkpoint")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise CheckpointError(f"{self._source}: checkpoint is truncated (storage {key} missing)") from None
            buf = np.frombuffer(bytearray(raw), dtype=np.uint8)
            self._storages[key] = torch.from_numpy(buf).view(dtype) if len(buf) else torch.empty(0, dtype=dtype)
        return self._storages[key]


def load_allowlisted(path: str | Path) -> Any:
    """Load a PyTorch zip checkpoint, refusing any pickled object that is not on the allow-list."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (expected the zip format written by torch.save); "
            "legacy or corrupt files are not supported"
        ) from None
    with archive:
        pkl_names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl_names:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (no data.pkl inside)")
        prefix = pkl_names[0].rsplit("/", 1)[0] if "/" in pkl_names[0] else ""
        try:
            with archive.open(pkl_names[0]) as fh:
                return _AllowListUnpickler(fh, archive, prefix, path).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, RuntimeError, zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"{path}: corrupt checkpoint ({err.__class__.__name__}: {err})") from None
