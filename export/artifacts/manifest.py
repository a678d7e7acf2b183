"""`manifest.json`: what an export directory holds, with the SHA-256 and size of every file.

Torch-free (numpy and onnx at most), because a device without PyTorch verifies
an export before it builds an engine from it. The manifest carries no
timestamps, so the same export settings give the same manifest bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from engines.files import check_index_names, index_files, verify_files
from export.artifacts.files import read_json, write_bytes_atomic
from export.artifacts.interface import ModelInterface
from export.errors import ExportError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "mtlora-export/manifest/1"


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
    artifacts = _artifact_files(directory)
    files = index_files(directory, artifacts, sizes=True)
    graphs = {p.relative_to(directory).as_posix(): graph_io(p) for p in artifacts if p.suffix == ".onnx"}
    manifest = {
        "format": MANIFEST_FORMAT,
        **fields,
        "files": files,
        "graphs": graphs,
        "versions": package_versions(),
    }
    payload = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return write_bytes_atomic(directory / MANIFEST_FILE, payload)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{path}: no manifest; this is not an export directory, or it was not finished")
    manifest = read_json(path, corrupt=f"{path}: corrupt manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "files" not in manifest:
        raise ExportError(f"{path}: not an mtlora-export manifest (expected format {MANIFEST_FORMAT})")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("size"), int)
                                              for e in files.values()):
        raise ExportError(f"{path}: corrupt manifest (every file needs a relative name, a sha256 and a size)")
    check_index_names(files, str(path), ExportError)
    return manifest


def verify_manifest(directory: str | os.PathLike) -> None:
    """Check every file the manifest lists: present, same size, same SHA-256.

    Raises ExportError naming each missing, truncated or modified file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest["files"], where=MANIFEST_FILE, remedy="re-run the export", error=ExportError)


@dataclass(frozen=True)
class ExportInfo:
    """What an export directory's manifest says about the model and its graphs."""

    interface: ModelInterface
    layout: str
    graph_files: dict[str, str]  # role ("model", "backbone", "head_<task>") -> file
    backbone_outputs: tuple[str, ...]
    source_sha256: str
    source_name: str

    @property
    def identity(self) -> dict[str, Any]:
        """What identifies the model for a baseline comparison: its interface and its weights."""
        identity = {"tasks": list(self.interface.tasks), "output_channels": dict(self.interface.channels),
                    "input_size": self.interface.size, "source_sha256": self.source_sha256}
        if self.interface.postprocessed:
            identity["postprocessed"] = True
        return identity

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ExportInfo:
        manifest = read_manifest(directory)
        where = str(Path(directory) / MANIFEST_FILE)
        try:
            inputs = manifest["input"]
            interface = ModelInterface.from_dict(
                {"tasks": manifest["tasks"], "output_channels": manifest["output_channels"],
                 "input_size": inputs["shape"][-1], "mean": inputs["mean"], "std": inputs["std"],
                 "postprocessed": bool(manifest.get("postprocess", False))}, where)
            graph_files = {str(k): str(v) for k, v in dict(manifest["graph_files"]).items()}
            source = manifest.get("source") or {}
            return cls(interface, str(manifest["layout"]), graph_files, tuple(manifest.get("backbone_outputs") or ()),
                       str(source.get("sha256", "")), str(source.get("checkpoint", "")))
        except (KeyError, TypeError, IndexError) as err:
            raise ExportError(f"{where}: the manifest lacks {err}; re-run the export") from None
