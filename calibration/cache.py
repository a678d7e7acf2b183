"""Calibration cache: quantized graphs keyed by what produced them.

The key is SHA-256 over (the source ONNX bytes, the calibration set's fingerprint, the quantization
settings as sorted JSON). An entry is a directory ``<root>/<key>/`` holding the result files and a
``manifest.json`` that repeats the key and records every file's SHA-256. Files are written atomically
and the manifest last, so an interrupted write leaves no entry. An entry is used only when its manifest
names the same key and every file still matches its hash; anything else is a miss and gets rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calibration.errors import CalibrationError
from engines.files import index_files, verify_files, write_atomic

MANIFEST = "manifest.json"
CACHE_FORMAT = "mtlora-calibration-cache/1"


def cache_key(onnx: str | os.PathLike | bytes, calibration_fingerprint: str, settings: Mapping[str, Any]) -> str:
    """SHA-256 of (ONNX bytes, calibration fingerprint, settings JSON)."""
    onnx_bytes = onnx if isinstance(onnx, bytes) else Path(onnx).read_bytes()
    digest = hashlib.sha256()
    for part in (
        hashlib.sha256(onnx_bytes).digest(),
        calibration_fingerprint.encode(),
        json.dumps(dict(settings), sort_keys=True, default=str).encode(),
    ):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


class CalibrationCache:
    """A directory of cache entries. `lookup(key)` -> {file name: path} or None; `store(key, files)`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"CalibrationCache({str(self.root)!r})"

    def entry_dir(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise CalibrationError(f"calibration cache key must be a SHA-256 hex digest, got {key!r}")
        return self.root / key

    def lookup(self, key: str) -> dict[str, Path] | None:
        entry = self.entry_dir(key)
        files = self._valid_files(entry, key)
        if files is None:
            self.misses += 1
            return None
        self.hits += 1
        return files

    def manifest(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.entry_dir(key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def store(
        self, key: str, files: Mapping[str, str | os.PathLike | bytes], info: Mapping[str, Any] | None = None
    ) -> dict[str, Path]:
        """Copy `files` ({name in the entry: source path or bytes}) into the entry for `key`."""
        if not files:
            raise CalibrationError("nothing to store in the calibration cache")
        entry = self.entry_dir(key)
        entry.mkdir(parents=True, exist_ok=True)
        # An older manifest must not vouch for files we are about to replace.
        (entry / MANIFEST).unlink(missing_ok=True)
        stored = {}
        for name, source in files.items():
            if Path(name).name != name:
                raise CalibrationError(f"cache file names must be plain names, got {name!r}")
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            stored[name] = write_atomic(entry / name, data)
        manifest = {
            "format": CACHE_FORMAT,
            "key": key,
            "files": index_files(entry, stored.values()),
            "info": dict(info or {}),
        }
        write_atomic(entry / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return stored

    @staticmethod
    def _valid_files(entry: Path, key: str) -> dict[str, Path] | None:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
            return None
        listed = manifest.get("files")
        if not isinstance(listed, dict) or not listed:
            return None
        try:
            return verify_files(entry, listed, where=MANIFEST, remedy="rebuilding it", error=CalibrationError)
        except CalibrationError:  # a damaged entry is a miss: the result is computed again
            return None
