"""The build directory: one object that knows where every step's results live.

    BUILD/
      export/                 ONNX graph(s), manifest.json, reference.npz   (the export step)
      graphs/<engine>/        prepared fp16 / Q-DQ / NNCF graphs             (calibration)
      calibration-cache/      calibration results keyed by ONNX, data and settings
      engines/<engine>/       engine files, their sidecars, engine.json
      candidates/<engine>/    engines built only to compare (--precision auto, the 16-bit engine an
                              int8 fallback is timed against); the chosen one is copied to engines/
      fallback/<engine>.json  the layers an int8 fallback kept in fp32 (reuse: --keep-fp32 @FILE)
      evalset.npz             a small labelled evaluation sample with its PyTorch references
      report.json junit.xml summary.md report.html    the accuracy records
      build.json              the build record, written last: options, steps, hashes of the records

A step's directory holds `.step.json` with the key it was computed from. The
build holds `.lock` while a build or check writes into it, so two builds into
one directory never interleave.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from export.errors import ExportError

STEP_FILE = ".step.json"
LOCK_FILE = ".lock"


class BuildDir:
    EXPORT = "export"
    GRAPHS = "graphs"
    CALIBRATION_CACHE = "calibration-cache"
    ENGINES = "engines"
    CANDIDATES = "candidates"
    FALLBACK = "fallback"
    EVALSET = "evalset.npz"
    RECORD = "build.json"
    REPORT, JUNIT, SUMMARY, HTML = "report.json", "junit.xml", "summary.md", "report.html"
    RECORDS = (REPORT, JUNIT, SUMMARY, HTML)  # written before the build record, which lists their hashes
    # What a build writes at its top level, and so replaces in the directory `--out` names.
    OWN_ENTRIES = (EXPORT, GRAPHS, CALIBRATION_CACHE, ENGINES, CANDIDATES, FALLBACK, EVALSET, RECORD, *RECORDS)
    EVAL_BATCHES_PREFIX = ".eval-batches-"  # the evaluation batches a build keeps on disk (pipeline.eval_cache)

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BuildDir({str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    @property
    def export(self) -> Path:
        return self.root / self.EXPORT

    @property
    def calibration_cache(self) -> Path:
        return self.root / self.CALIBRATION_CACHE

    @property
    def engines(self) -> Path:
        return self.root / self.ENGINES

    @property
    def evalset(self) -> Path:
        return self.root / self.EVALSET

    @property
    def record(self) -> Path:
        return self.root / self.RECORD

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    def graphs(self, engine: str) -> Path:
        """Where an engine's prepared graphs go (`calibration.prepare` adds fp16/, qdq/ or nncf/)."""
        return self.root / self.GRAPHS / engine

    def prepared_graphs(self, kind: str, file: str) -> list[Path]:
        """Every engine's prepared `kind` ('fp16', 'qdq') graph of the exported `file`, in name order."""
        return sorted((self.root / self.GRAPHS).glob(f"*/{kind}/{file}"))

    def engine(self, key: str) -> Path:
        return self.engines / key

    def candidate(self, key: str) -> Path:
        """Where an engine set built only for comparison lives."""
        return self.root / self.CANDIDATES / key

    def fallback_file(self, key: str) -> Path:
        """The int8 fallback's layer list for the engine set `key`, in the --keep-fp32 @FILE format."""
        return self.root / self.FALLBACK / f"{key}.json"

    def engine_dirs(self) -> list[Path]:
        if not self.engines.is_dir():
            return []
        return [d for d in sorted(self.engines.iterdir()) if d.is_dir() and not d.name.startswith(".")]

    @classmethod
    def is_build(cls, path: str | os.PathLike) -> bool:
        path = Path(path)
        return path.is_dir() and ((path / cls.RECORD).is_file() or (path / cls.ENGINES).is_dir())

    def has_build_marks(self) -> bool:
        """Whether a build wrote here: its record, or a finished step (one killed before its record)."""
        return self.record.is_file() or (self.export / STEP_FILE).is_file() or any(self.engines.glob(f"*/{STEP_FILE}"))

    def entries_not_ours(self) -> list[str]:
        """The entries of an existing directory that is not a build which a build into it would replace
        (a source tree has its own `export/` and `engines/`; a folder of notes its own `summary.md`)."""
        if not self.root.is_dir() or self.has_build_marks():
            return []
        return [name for name in self.OWN_ENTRIES if (self.root / name).exists() or (self.root / name).is_symlink()]

    def stale_partials(self) -> Iterator[Path]:
        """Staging folders a killed step left behind (`.<name>.partial`, `.<name>.*.partial`)."""
        for parent in (self.root, self.engines, self.root / self.CANDIDATES):
            if parent.is_dir():
                yield from (p for p in parent.glob(".*.partial") if p.is_dir())
        # The evaluation batches a killed build kept on disk (`export.pipeline.eval_cache`).
        yield from (p for p in self.root.glob(f"{self.EVAL_BATCHES_PREFIX}*") if p.is_dir())

    @contextlib.contextmanager
    def locked(self, what: str = "build") -> Iterator[None]:
        """Hold the build directory for one writer; a second one is refused with who holds it."""
        import fcntl

        path = self.root / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ExportError(f"{self.root}: cannot take the build lock ({err.strerror or err}); "
                              "choose another --out") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise ExportError(f"{self.root}: another build is writing here ({holder}); wait for it to "
                                  "finish or choose another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what}, pid {os.getpid()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def release_lock_file(self) -> None:
        """Remove the lock file (when the build leaves nothing else behind)."""
        (self.root / LOCK_FILE).unlink(missing_ok=True)
