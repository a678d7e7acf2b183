"""Cached build steps: each records the key it was computed from, and is reused only when
the key matches and its files verify, so an interrupted build never leaves a step that looks complete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from export.artifacts.builddir import STEP_FILE
from export.artifacts.files import write_json_atomic
from export.errors import ExportError
from mtlora_base.files import commit_directory, staging_dir


def step_key(*parts) -> str:
    """SHA-256 over the JSON of everything a step's result depends on."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def step_matches(directory: Path, key: str) -> bool:
    try:
        return json.loads((directory / STEP_FILE).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def mark_step(directory: Path, key: str, **info) -> None:
    write_json_atomic(directory / STEP_FILE, {"key": key, **info})


def staging_for(directory: Path) -> Path:
    """An empty staging directory next to `directory`, for `publish` when the step is done (one a killed
    step left behind goes with `BuildDir.stale_partials`)."""
    return staging_dir(directory, error=ExportError)


def publish(staging: Path, directory: Path) -> None:
    commit_directory(staging, directory)
