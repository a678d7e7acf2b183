"""Atomic file and directory writes (torch-free, so deployment code on a device can use them).

A result is written beside its final name and renamed into place, so a crash
or a kill never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mtlora.errors import CheckpointError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def commit_directory(staging: Path, final: Path) -> None:
    """Move a fully written staging directory to its final name, replacing an old one."""
    final = Path(final)
    # mkdtemp made the staging directory 0700; published results get the usual permissions.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(final: Path) -> Path:
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"{final}: exists and is not a directory; choose another output path")
    parent = final.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{parent}: directory is not writable; choose another output path")
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".partial"))
