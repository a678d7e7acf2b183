"""What every backend shares: the runner interface, the engine artifact and its sidecar manifest.

An engine file stays in its backend's own format (ONNX, OpenVINO IR or blob, TensorRT plan). Everything
we know about it -- which precision was asked for and which one really ran, the device and SDK versions
it was built for, the SHA-256 of every file -- lives in a JSON sidecar next to it:
``<engine file>.json``. Loading reads the sidecar first and refuses files whose hashes do not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import EngineError

SIDECAR_FORMAT = "mtlora-engine/1"
SIDECAR_SUFFIX = ".json"


# ----------------------------------------------------------------------------- file helpers


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half of it.

    A temp file in the same directory is written, fsynced and renamed over `path` (os.replace).
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise EngineError(f"{path}: cannot write here ({exc.strerror or exc}); choose another output path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; engines and caches are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    return write_atomic(dst, Path(src).read_bytes())


# ----------------------------------------------------------------------------- tensor metadata


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


def load_onnx(path: str | os.PathLike, *, load_external_data: bool = True):
    """Load an ONNX file, turning a missing or unparsable file into an EngineError."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"ONNX file not found: {path}; export the model first or check the path")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises its own; both mean a bad file
        raise EngineError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from exc
    if not model.graph.node:
        raise EngineError(f"{path} holds an ONNX model with no nodes; re-export it")
    return model


# ----------------------------------------------------------------------------- the artifact


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
            "files": {p.relative_to(base).as_posix(): sha256_file(p) for p in self.paths},
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
        if any(Path(rel).is_absolute() or ".." in Path(rel).parts for rel in files):
            raise EngineError(f"{sidecar} lists files outside its directory; rebuild the engine")
        engine = base / data["engine"]
        if verify:
            for rel, digest in files.items():
                file = base / rel
                if not file.is_file():
                    raise EngineError(f"engine file {file} listed in {sidecar.name} is missing; rebuild the engine")
                if sha256_file(file) != digest:
                    raise EngineError(
                        f"{file} does not match the SHA-256 in {sidecar.name} (corrupt or replaced); rebuild the engine"
                    )
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


def engine_file(graph_path: Path, output_dir: str | os.PathLike, name: str | None, precision: str, suffix: str) -> Path:
    """`<output_dir>/<name>.<precision><suffix>` (output_dir created), never the graph it is built from."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / f"{name or graph_path.stem}.{precision}{suffix}"
    if out.resolve() == graph_path.resolve():
        raise EngineError(f"the engine {out} would overwrite the graph it is built from; pick another output_dir or name")
    return out


def source_metadata(graph_path: Path, graph_sha256: str, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Where an engine came from. A prepared graph's metadata names the original ONNX and wins;
    without it the graph is its own source."""
    return {"source_onnx": str(graph_path), "source_sha256": graph_sha256, **dict(metadata or {})}


def sidecar_path_for(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


# ----------------------------------------------------------------------------- the runner


class Runner:
    """Base class of every backend runner: a context manager with a checked, timed `infer`.

    Subclasses implement `_activate`, `_deactivate`, `_infer` and fill `self.inputs` / `self.outputs`
    (lists of TensorMeta) in `_activate`.
    """

    def __init__(self, name: str):
        self.name = name
        self.inputs: list[TensorMeta] = []
        self.outputs: list[TensorMeta] = []
        self.timings: list[float] = []
        self.notes: list[str] = []
        self.precision_executed: str = ""
        self.is_active = False

    # lifecycle --------------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    # inference --------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [m.name for m in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [m.name for m in self.outputs]

    def last_inference_time(self) -> float | None:
        """Seconds the last `infer` spent in the backend (checks excluded), or None before the first."""
        return self.timings[-1] if self.timings else None

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise EngineError(f"runner {self.name} is not active; use it as `with runner:` or call activate()")
        feed = self.check_feed(feed)
        start = time.perf_counter()
        outputs = self._infer(feed)
        self.timings.append(time.perf_counter() - start)
        return outputs

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, dtypes and shapes against the model's inputs; returns contiguous arrays."""
        if not isinstance(feed, Mapping):
            raise EngineError(f"feed must be a dict of input name -> numpy array, got {type(feed).__name__}")
        expected = {m.name: m for m in self.inputs}
        missing = [n for n in expected if n not in feed]
        unknown = [n for n in feed if n not in expected]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if unknown:
                parts.append(f"unexpected {unknown}")
            raise EngineError(
                f"{self.name}: feed names do not match the model ({'; '.join(parts)}); "
                f"expected {[m.describe() for m in self.inputs]}"
            )
        checked = {}
        for name, meta in expected.items():
            array = feed[name]
            if not isinstance(array, np.ndarray):
                raise EngineError(f"{self.name}: input '{name}' must be a numpy array, got {type(array).__name__}")
            if array.dtype != meta.dtype:
                raise EngineError(
                    f"{self.name}: input '{name}' has dtype {array.dtype}, the model expects "
                    f"{np.dtype(meta.dtype).name}; convert it with .astype(np.{np.dtype(meta.dtype).name})"
                )
            if not shape_matches(array.shape, meta.shape):
                raise EngineError(
                    f"{self.name}: input '{name}' has shape {tuple(array.shape)}, the model expects "
                    f"{meta.describe()} (? = any size)"
                )
            checked[name] = np.ascontiguousarray(array)
        return checked

    # to implement -----------------------------------------------------------------------
    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def shape_matches(actual: Sequence[int], expected: Sequence[int | None]) -> bool:
    return len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected, strict=True))
