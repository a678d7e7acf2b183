"""Atomic file and directory writes: a result is written beside its final name and renamed into
place, so a crash or a kill never leaves a half-written file or directory under the final name.

A place that cannot be written (or a full disk) raises the caller's own error type (`error=`), one
line that says what to do, so each package reports it the way its command line expects.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

# What to do about an operating-system error, by its errno: the hint must name the real cause (a permission
# is not a full disk).
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


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (best effort: some file systems cannot open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def why_not_writable(path: str | os.PathLike, err: OSError) -> str:
    """Why `path` could not be created, in words: a parent that is a file says more than "File exists"."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            break
    return err.strerror or str(err)


def publish_mode(path: str | os.PathLike) -> None:
    """Give a file or directory made by tempfile (0600 / 0700) the usual permissions (umask applied)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def write_atomic(path: str | os.PathLike, data: bytes | str, *, error: type[Exception],
                 make_parents: bool = False, mode: int | None = None) -> Path:
    """Write `data` to a temp file beside `path`, fsync it and rename it over `path`: readers see the old
    file or the whole new one, never half of it. `mode`: the file's permissions (default: the usual
    ones, umask applied). A place that cannot be written, or a full disk, raises `error`."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise error(f"{path}: cannot write here ({why_not_writable(path, err)}); choose another output path") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None:
            publish_mode(tmp)
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as err:  # a full disk (ENOSPC), a quota, an I/O error
        Path(tmp).unlink(missing_ok=True)
        raise error(f"{path}: could not be written ({err.strerror or err}); {os_error_hint(err)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def refuse_foreign_directory(final: str | os.PathLike, *, marker: str, what: str, error: type[Exception],
                             only: Collection[str] | None = None) -> None:
    """`commit_directory` replaces `final` whole, so an existing directory may be replaced only when it is
    empty or an earlier result of the same kind (it holds `marker`, and with `only`, nothing else than
    those names), never a folder of someone's files."""
    final = Path(final)
    if not final.is_dir():
        return
    try:
        entries = sorted(entry.name for entry in final.iterdir())
    except OSError as err:
        raise error(f"{final}: cannot be read ({err.strerror or err}); choose another output path") from None
    if (final / marker).exists():
        entries = [] if only is None else [name for name in entries if name not in only]
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise error(f"{final}: is a directory that is not a {what} (it holds {shown}) and writing the {what} "
                    "would replace it; choose a new or empty directory, or remove it first")


def staging_dir(final: str | os.PathLike, *, error: type[Exception], marker: str | None = None,
                what: str = "result", only: Collection[str] | None = None) -> Path:
    """A new empty directory beside `final` (`.<name>.<random>.partial`) to write a result into before
    `commit_directory` publishes it; an unwritable place raises `error`. With `marker`, an existing
    directory at `final` must be empty or hold that file (`refuse_foreign_directory`)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise error(f"{final}: exists and is not a directory; choose another output path")
    if marker is not None:
        refuse_foreign_directory(final, marker=marker, what=what, error=error, only=only)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # os.access is not enough: root passes it for a read-only directory, so try to create the staging one.
        return Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".partial"))
    except OSError as err:
        raise error(f"{final}: cannot write here ({why_not_writable(final, err)}); choose another output path") from None


def commit_directory(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written staging directory to its final name, replacing an old one."""
    final = Path(final)
    # Every file must be on disk before the rename makes the directory visible under its final name
    # (some writers, e.g. safetensors, do not fsync).
    for path in Path(staging).rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            publish_mode(path)  # some writers (safetensors, tempfile) leave 0600
    publish_mode(staging)  # mkdtemp made it 0700
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
