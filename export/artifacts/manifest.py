"""`manifest.json`: what an export directory holds, with the SHA-256 and size of every file.

Torch-free (numpy and onnx at most), because a device without PyTorch verifies
an export before it builds an engine from it. The manifest carries no
timestamps, so the same export settings give the same manifest bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from engines.files import sha256_file
from export.errors import ExportError
from mtlora import fileio

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "mtlora-export/manifest/1"


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 identifying a source checkpoint: the file itself, or for a checkpoint
    directory a digest over the sorted `name sha256` lines of its files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [
        f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n"
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> Path:
    """Readers see the old file or the whole new one, never half of it (an unwritable place is an ExportError)."""
    return fileio.write_bytes_atomic(path, payload, error=ExportError)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shaped the artifacts, read without importing torch."""
    from mtlora import __version__

    versions = {"mtlora-export": __version__}
    for dist in ("torch", "onnx", "timm", "onnxslim"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _shape(value_info) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def graph_io(path: str | os.PathLike) -> dict[str, dict[str, list[int | str]]]:
    """Input and output names and shapes of an ONNX file (symbolic dims by name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        "inputs": {v.name: _shape(v) for v in model.graph.input},
        "outputs": {v.name: _shape(v) for v in model.graph.output},
    }


def _artifact_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def write_manifest(directory: str | os.PathLike, **fields: Any) -> Path:
    """Describe every file in `directory` in `manifest.json`, written atomically.

    `fields` (layout, opset, tasks, input size, source checkpoint hash, ...) are
    stored as given; files, ONNX input/output shapes and package versions are
    filled in here.
    """
    directory = Path(directory)
    files = {}
    graphs = {}
    for path in _artifact_files(directory):
        name = path.relative_to(directory).as_posix()
        files[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        if path.suffix == ".onnx":
            graphs[name] = graph_io(path)
    manifest = {
        "format": MANIFEST_FORMAT,
        **fields,
        "files": files,
        "graphs": graphs,
        "versions": package_versions(),
    }
    payload = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return write_bytes_atomic(directory / MANIFEST_FILE, payload)


def read_json(path: Path, *, corrupt: str, missing: str | None = None) -> Any:
    """The JSON in `path`, or one ExportError line: `missing` when there is no such file (when given),
    else `corrupt` followed by the reason (unreadable, not UTF-8, not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        if missing is None:
            raise ExportError(f"{corrupt} (no such file)") from None
        raise ExportError(missing) from None
    except (OSError, ValueError) as err:  # ValueError: also undecodable bytes
        raise ExportError(f"{corrupt} ({err})") from None


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{path}: no manifest; this is not an export directory, or it was not finished")
    manifest = read_json(path, corrupt=f"{path}: corrupt manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "files" not in manifest:
        raise ExportError(f"{path}: not an mtlora-export manifest (expected format {MANIFEST_FORMAT})")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
        and not Path(name).is_absolute() and ".." not in Path(name).parts
        for name, e in files.items()
    ):
        raise ExportError(f"{path}: corrupt manifest (every file needs a relative name, a sha256 and a size)")
    return manifest


def verify_manifest(directory: str | os.PathLike) -> None:
    """Check every file the manifest lists: present, same size, same SHA-256.

    Raises ExportError naming each missing, truncated or modified file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size < entry["size"]:
            problems.append(f"{name} is truncated ({size} of {entry['size']} bytes)")
        elif size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} was modified (SHA-256 does not match the manifest)")
    if problems:
        raise ExportError(f"{directory}: {'; '.join(problems)}; re-run the export")
