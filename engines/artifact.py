"""The engine artifact: an engine file in its backend's own format plus our JSON sidecar.

An engine file stays in its backend's own format (ONNX, OpenVINO IR or blob, TensorRT plan). Everything
we know about it -- which precision was asked for and which one really ran, the device and SDK versions
it was built for, the SHA-256 of every file -- lives in a JSON sidecar next to it:
``<engine file>.json``. Loading reads the sidecar first and refuses files whose hashes do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import EngineError
from engines.files import check_index_names, index_files, verify_files, write_atomic

SIDECAR_FORMAT = "mtlora-engine/1"
SIDECAR_SUFFIX = ".json"


@dataclass(frozen=True)
class TensorMeta:
    """One model input or output: `shape` holds None for a dynamic dimension (the batch, usually)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": np.dtype(self.dtype).name, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorMeta:
        return cls(d["name"], np.dtype(d["dtype"]), tuple(d["shape"]))

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"


def onnx_io_metadata(model) -> tuple[list[TensorMeta], list[TensorMeta]]:
    """Inputs and outputs of an `onnx.ModelProto`, initializers excluded."""
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}

    def meta(value_info) -> TensorMeta:
        tensor_type = value_info.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        return TensorMeta(value_info.name, dtype, dims)

    inputs = [meta(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [meta(v) for v in model.graph.output]


@dataclass
class EngineArtifact:
    """A built engine: its files, and what we know about how it was built.

    `precision_requested` is what the user asked for ('fp32', 'fp16', 'bf16', 'int8');
    `precision_executed` is what the backend reports it really runs (e.g. OpenVINO's read-back
    INFERENCE_PRECISION_HINT, or 'int8' only when int8 kernels were found in the runtime graph).
    """

    backend: str
    path: Path
    precision_requested: str
    precision_executed: str
    device: str
    extra_paths: tuple[Path, ...] = ()
    inputs: tuple[TensorMeta, ...] = ()
    outputs: tuple[TensorMeta, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.path, *self.extra_paths)

    @property
    def sidecar_path(self) -> Path:
        return sidecar_path_for(self.path)

    def to_json(self) -> dict[str, Any]:
        base = self.path.parent
        return {
            "format": SIDECAR_FORMAT,
            "backend": self.backend,
            "engine": self.path.name,
            "files": index_files(base, self.paths),
            "precision_requested": self.precision_requested,
            "precision_executed": self.precision_executed,
            "device": self.device,
            "inputs": [m.to_json() for m in self.inputs],
            "outputs": [m.to_json() for m in self.outputs],
            "metadata": self.metadata,
            "notes": list(self.notes),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self) -> Path:
        """Write the sidecar (after the engine files, so a sidecar always describes complete files)."""
        return write_atomic(self.sidecar_path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str | None = None, verify: bool = True) -> EngineArtifact:
        """Read an artifact from its engine file or its sidecar; checks the file hashes unless told not to."""
        path = Path(path)
        sidecar = path if path.suffix == SIDECAR_SUFFIX else sidecar_path_for(path)
        if not sidecar.is_file():
            if not path.exists():
                raise EngineError(f"engine not found: {path}; build it first")
            raise EngineError(f"{path} has no sidecar {sidecar.name}; rebuild the engine with this tool")
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"engine sidecar {sidecar} is not valid JSON; rebuild the engine") from exc
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise EngineError(f"{sidecar} is not an engine sidecar of format {SIDECAR_FORMAT}; rebuild the engine")
        if backend is not None and data.get("backend") != backend:
            raise EngineError(
                f"{sidecar.name} describes a {data.get('backend')} engine, not {backend}; load it with that backend"
            )
        base = sidecar.parent
        files = data.get("files")
        if not isinstance(files, dict) or not isinstance(data.get("engine"), str) or data["engine"] not in files:
            raise EngineError(f"{sidecar} does not list the engine file and its SHA-256; rebuild the engine")
        check_index_names(files, str(sidecar))
        engine = base / data["engine"]
        if verify:
            verify_files(base, files, where=sidecar.name, remedy="rebuild the engine")
        extra = tuple(base / rel for rel in files if base / rel != engine)
        try:
            return cls(
                backend=data["backend"],
                path=engine,
                precision_requested=data["precision_requested"],
                precision_executed=data["precision_executed"],
                device=data["device"],
                extra_paths=extra,
                inputs=tuple(TensorMeta.from_json(m) for m in data.get("inputs", [])),
                outputs=tuple(TensorMeta.from_json(m) for m in data.get("outputs", [])),
                metadata=dict(data.get("metadata", {})),
                notes=tuple(data.get("notes", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{sidecar} is incomplete ({type(exc).__name__}: {exc}); rebuild the engine") from None


def sidecar_field_digests(sidecar: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every top-level field of a sidecar (of its canonical JSON), by field name: what a build
    records so that an edit of any field (precision_executed, device, metadata...) is found and named.
    A sidecar that cannot be read gives {} (loading it says why)."""
    try:
        data = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest() for key, value in data.items()}


def edited_fields(recorded: Mapping[str, str], sidecar: str | os.PathLike) -> list[str]:
    """The fields of `sidecar` that differ from the digests `recorded` when it was built (added, removed
    or changed), sorted."""
    now = sidecar_field_digests(sidecar)
    return sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))


def sidecar_path_for(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)
