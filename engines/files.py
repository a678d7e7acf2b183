"""File helpers every backend and the calibration share: hashing, atomic writes, ONNX loading, engine names.

Torch-free and SDK-free; `onnx` is imported only when a graph is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.errors import EngineError


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
