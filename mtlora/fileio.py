"""Atomic writes for the model side: `mtlora_base.files` with mtlora's errors (torch-free, so deployment
code on a device can use them). A place that cannot be written is a CheckpointError unless told otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from mtlora.errors import CheckpointError, MTLoRAError
from mtlora_base import files
from mtlora_base.files import commit_directory, os_error_hint, publish_mode, why_not_writable

__all__ = ["commit_directory", "os_error_hint", "publish_mode", "staging_dir", "why_not_writable", "write_bytes_atomic",
           "write_json_atomic"]


def write_bytes_atomic(path: str | os.PathLike, payload: bytes,
                       error: type[MTLoRAError] = CheckpointError) -> Path:
    """Readers see the old file or the whole new one, never half of it; a place that cannot be written
    raises `error`."""
    return files.write_atomic(path, payload, error=error)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def staging_dir(final: Path, marker: str | None = None, what: str = "result",
                only: Collection[str] | None = None) -> Path:
    """A staging directory beside `final`, for `commit_directory`; with `marker`, an existing non-empty
    directory at `final` that lacks that file (or, with `only`, holds other names) is refused rather than
    replaced."""
    return files.staging_dir(final, error=CheckpointError, marker=marker, what=what, only=only)
