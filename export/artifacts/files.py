"""Atomic writes and checked reads of the files the tool writes (torch-free).

Writers put a file beside its final name and rename it into place, so a reader
sees the old file or the whole new one; a place that cannot be written (or a
full disk) is one ExportError line. Readers turn a missing or corrupt file into
one line that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from engines.files import sha256_file
from export.errors import ExportError
from mtlora_base.files import write_atomic


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> Path:
    """Readers see the old file or the whole new one, never half of it (an unwritable place is an ExportError)."""
    return write_atomic(path, payload, error=ExportError)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Sorted, indented JSON with a final newline (paths and other objects as strings)."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, *, corrupt: str, missing: str | None = None) -> Any:
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
