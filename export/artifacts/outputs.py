"""A command's output files published together: all of them, or none (torch-free).

`OutputSet` writes every file into a staging directory beside the outputs; `publish` then moves
them to their final names. A write that fails, a final name that cannot take a file, or a move
that fails part way leaves the outputs as they were before the command (older files of the same
names are put back).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from export.errors import ExportError
from mtlora.fileio import publish_mode, why_not_writable


class OutputSet:
    """Files staged under `staging` and published to `directory` as one set."""

    def __init__(self, directory: str | os.PathLike, what: str = "--out"):
        self.directory = Path(directory)
        self.what = what
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(dir=self.directory, prefix=".outputs.", suffix=".partial"))
        except OSError as err:
            raise ExportError(f"{what} {self.directory}: cannot write here ({why_not_writable(self.directory, err)}); "
                              "choose another output path") from None
        self.names: list[str] = []

    def write(self, name: str, payload: bytes) -> None:
        """Stage one file; `name` is a plain file name in the output directory."""
        if Path(name).name != name or name in self.names:
            raise ExportError(f"internal: output name {name!r} is not one new plain file name")
        try:
            (self.staging / name).write_bytes(payload)
        except OSError as err:
            self.discard()
            raise ExportError(f"{self.what} {self.directory / name}: could not be written "
                              f"({err.strerror or err}); nothing was written") from None
        self.names.append(name)

    def publish(self) -> list[Path]:
        """Move every staged file to its final name, all or none; returns the final paths."""
        finals = [self.directory / name for name in self.names]
        for final in finals:
            if final.is_dir() and not final.is_symlink():
                self.discard()
                raise ExportError(f"{self.what} {final}: is a directory, so the output cannot take its name; "
                                  "move it away or choose another --out; nothing was written")
        moved: list[tuple[Path, Path | None]] = []  # (final, the older file it replaced, kept in staging)
        try:
            for name, final in zip(self.names, finals, strict=True):
                backup = None
                if final.exists() or final.is_symlink():
                    backup = self.staging / f".old.{name}"
                    os.replace(final, backup)
                moved.append((final, backup))
                publish_mode(self.staging / name)
                os.replace(self.staging / name, final)
        except OSError as err:
            failed = final
            for done, backup in reversed(moved):
                done.unlink(missing_ok=True)
                if backup is not None:
                    os.replace(backup, done)
            self.discard()
            raise ExportError(f"{self.what} {failed}: could not be written ({err.strerror or err}); "
                              "nothing was written") from None
        self.discard()
        return finals

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
