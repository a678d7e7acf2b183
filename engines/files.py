"""File helpers every backend and the calibration share: hashing, atomic writes, ONNX loading, engine names.

Torch-free and SDK-free; `onnx` is imported only when a graph is loaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from engines.errors import EngineError
from mtlora_base import files


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half of it
    (`mtlora_base.files.write_atomic`; the directory is made, engines and caches are meant to be shared)."""
    return files.write_atomic(path, data, error=EngineError, make_parents=True, mode=mode)



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
        missing = missing_external_data(path) if load_external_data else []
        if missing:
            raise EngineError(f"{path}: its external data file(s) {', '.join(missing)} are missing from "
                              f"{path.parent}; copy them there beside the graph, or re-export it") from None
        raise EngineError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from exc
    if not model.graph.node:
        raise EngineError(f"{path} holds an ONNX model with no nodes; re-export it")
    return model


def missing_external_data(path: Path) -> list[str]:
    """The external data files an ONNX graph names that are not beside it (sorted; [] when none are
    missing or the graph itself cannot be read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - the graph itself is unreadable: the caller says so
        return []
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    locations = {entry.value for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return sorted(loc for loc in locations if not (path.parent / loc).is_file())


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


def set_onnx_metadata(model, key: str, value: str) -> None:
    """Set one `metadata_props` entry of an onnx.ModelProto (replacing an earlier value)."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


# ----------------------------------------------------------------------------- hashed file indexes


def index_files(base: str | os.PathLike, paths: Iterable[str | os.PathLike], *, sizes: bool = False) -> dict[str, Any]:
    """{name relative to `base`: SHA-256} of `paths` (or {name: {"sha256", "size"}} with `sizes`)."""
    base = Path(base)
    index: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        name = path.relative_to(base).as_posix()
        digest = sha256_file(path)
        index[name] = {"sha256": digest, "size": path.stat().st_size} if sizes else digest
    return index


def check_index_names(index: Mapping[str, Any], where: str, error: type[Exception] = EngineError) -> None:
    """Refuse an index whose names leave its directory (absolute, `..`) or whose entries are malformed."""
    for name, entry in index.items():
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise error(f"{where}: lists {name!r}, which is outside its directory")
        digest = entry.get("sha256") if isinstance(entry, Mapping) else entry
        if not isinstance(digest, str) or len(digest) != 64:
            raise error(f"{where}: the entry for {name!r} has no SHA-256")


def verify_files(
    base: str | os.PathLike,
    index: Mapping[str, Any],
    *,
    where: str,
    remedy: str,
    error: type[Exception] = EngineError,
) -> dict[str, Path]:
    """Check every file an index lists against it: present, a plain file (no symbolic link), same size
    when the index records one, same SHA-256. Raises `error` naming each problem; returns {name: path}.

    One loop for every hashed index we write (export manifest, engine sidecars, calibration cache,
    build record, bundle index), so each refuses damage the same way.
    """
    base = Path(base)
    check_index_names(index, where, error)
    problems, paths = [], {}
    for name, entry in sorted(index.items()):
        path = base / name
        digest = entry["sha256"] if isinstance(entry, Mapping) else entry
        size = entry.get("size") if isinstance(entry, Mapping) else None
        if path.is_symlink() or any(p.is_symlink() for p in path.parents if base in p.parents):
            problems.append(f"{name} is a symbolic link ({where} vouches for plain files only)")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif size is not None and path.stat().st_size < size:
            problems.append(f"{name} is truncated ({path.stat().st_size} of {size} bytes)")
        elif (size is not None and path.stat().st_size != size) or sha256_file(path) != digest:
            problems.append(f"{name} was modified (SHA-256 differs from {where})")
        else:
            paths[name] = path
    if problems:
        raise error(f"{base}: {'; '.join(problems)}; {remedy}")
    return paths
