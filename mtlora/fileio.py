"""Atomic file and directory writes (torch-free, so deployment code on a device can use them).

A result is written beside its final name and renamed into place, so a crash
or a kill never leaves a half-written file under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mtlora.errors import CheckpointError, MTLoRAError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What to do about an operating-system error, by its errno: the hint must name the real cause (a permission
# is not a full disk). `engines.files` keeps the same table (engines imports nothing of ours).
OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space or choose another output path",
    errno.EDQUOT: "your disk quota is used up: free some space or choose another output path",
    errno.EACCES: "check the permissions or choose another output path",
    errno.EPERM: "check the permissions or choose another output path",
    errno.EROFS: "the file system is read-only: choose another output path",
    errno.EIO: "the disk reported an I/O error: check the device or choose another output path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or close other programs",
    errno.ENOENT: "a directory on the path is missing (removed while writing?): check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another output path",
    errno.EISDIR: "the path is a directory: give a file name",
}


def os_error_hint(err: OSError) -> str:
    return OS_ERROR_HINTS.get(err.errno or 0, "check the path or choose another output path")


def why_not_writable(path: Path, err: OSError) -> str:
    """Why `path` could not be created, in words: a parent that is a file says more than "File exists"."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            break
    return err.strerror or str(err)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def publish_mode(path: str | os.PathLike) -> None:
    """Give a file or directory made by tempfile (0600 / 0700) the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def write_bytes_atomic(path: str | os.PathLike, payload: bytes,
                       error: type[MTLoRAError] = CheckpointError) -> Path:
    """Write `payload` to a temp file beside `path`, fsync it and rename it over `path`: readers see
    the old file or the whole new one, never half of it. A place that cannot be written raises `error`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise error(f"{path}: cannot write here ({why_not_writable(path, err)}); choose another output path") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a full disk (ENOSPC), a quota, an I/O error
        Path(tmp).unlink(missing_ok=True)
        raise error(f"{path}: could not be written ({err.strerror or err}); {os_error_hint(err)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def commit_directory(staging: Path, final: Path) -> None:
    """Move a fully written staging directory to its final name, replacing an old one."""
    final = Path(final)
    # Every file must be on disk before the rename makes the directory visible under its final name
    # (some writers, e.g. safetensors, do not fsync).
    for path in Path(staging).rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)
            publish_mode(path)  # some writers (safetensors, tempfile) leave 0600
    publish_mode(staging)  # mkdtemp made it 0700
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
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # os.access is not enough: root passes it for a read-only directory, so try to create the staging one.
        return Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".partial"))
    except OSError as err:
        raise CheckpointError(f"{final}: cannot write here ({why_not_writable(final, err)}); choose another output path") from None
