"""Cached build steps: each records the key it was computed from, and is reused only when
the key matches and its files verify, so an interrupted build never leaves a step that looks complete.

With $MTLORA_EXPORT_STEP_CACHE set to a directory, finished steps are also kept there by key
(`StepStore`), so a build into another directory that computes a step with the same key copies it
instead of computing it again (repeated builds of one model in different --out directories, the tests).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from engines.files import index_files, verify_files
from export.artifacts.builddir import STEP_FILE, BuildDir
from export.artifacts.files import write_json_atomic
from export.errors import ExportError
from mtlora_base.files import commit_directory, staging_dir

STORE_ENV = "MTLORA_EXPORT_STEP_CACHE"


def step_key(*parts) -> str:
    """SHA-256 over the JSON of everything a step's result depends on."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def step_matches(directory: Path, key: str) -> bool:
    """Whether `directory` holds the step computed from `key`. When it does not and the step store
    has that key, the stored step is copied into place first (and this is true)."""
    if _recorded_key(directory) == key:
        return True
    store = StepStore.from_env()
    return store is not None and store.restore(Path(directory), key)


def mark_step(directory: Path, key: str, **info) -> None:
    write_json_atomic(directory / STEP_FILE, {"key": key, **info})
    if not _is_staging(Path(directory)):  # a staged step is stored when it is published
        _remember(Path(directory), key)


def staging_for(directory: Path) -> Path:
    """An empty staging directory next to `directory`, for `publish` when the step is done (one a killed
    step left behind goes with `BuildDir.stale_partials`)."""
    return staging_dir(directory, error=ExportError)


def publish(staging: Path, directory: Path) -> None:
    commit_directory(staging, directory)
    key = _recorded_key(Path(directory))
    if key is not None:
        _remember(Path(directory), key)


def _recorded_key(directory: Path) -> str | None:
    try:
        key = json.loads((directory / STEP_FILE).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def _is_staging(directory: Path) -> bool:
    return directory.name.startswith(".") and directory.name.endswith(".partial")


def _remember(directory: Path, key: str) -> None:
    store = StepStore.from_env()
    if store is not None:
        store.save(directory, key)


def companions(directory: Path) -> dict[str, Path]:
    """What a step writes outside its own directory, by name: an engine set's prepared graphs
    (`graphs/<engine>`, which bundles and the TensorRT lint read)."""
    if directory.name != BuildDir.EXPORT and directory.parent.name in (BuildDir.ENGINES, BuildDir.CANDIDATES):
        return {"graphs": BuildDir(directory.parent.parent).graphs(directory.name)}
    return {}


class StepStore:
    """Finished steps by key: `<root>/<key>/step/` (the step directory), one folder per companion
    (`graphs/`), and `entry.json` with the SHA-256 of every file, written last. An entry is published
    with one rename, so concurrent builds never see half of one; an entry that does not verify is a miss
    and is replaced by the next build that computes the step. The store is a help: when it cannot be
    read or written the build goes on as without it."""

    ENTRY = "entry.json"
    STEP = "step"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def from_env(cls) -> StepStore | None:
        root = os.environ.get(STORE_ENV)
        return cls(root) if root else None

    def restore(self, directory: Path, key: str) -> bool:
        """Copy the stored step `key` to `directory` (and its companions beside it); False on a miss."""
        entry = self.root / key
        if not self._verifies(entry, key):
            return False
        try:
            for name, place in companions(directory).items():
                if (entry / name).is_dir():
                    _copy_into_place(entry / name, place)
            _copy_into_place(entry / self.STEP, directory)
        except (OSError, ExportError):
            return False
        return _recorded_key(directory) == key

    def save(self, directory: Path, key: str) -> None:
        """Keep a copy of the finished step in `directory` (and its companions) under `key`."""
        entry = self.root / key
        if self._verifies(entry, key):
            return
        staging = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:16]}.", suffix=".partial"))
            shutil.copytree(directory, staging / self.STEP)
            for name, place in companions(directory).items():
                if place.is_dir():
                    shutil.copytree(place, staging / name)
            files = [p for p in sorted(staging.rglob("*")) if p.is_file()]
            write_json_atomic(staging / self.ENTRY, {"key": key, "files": index_files(staging, files)})
            if entry.exists():  # damaged: replaced (a concurrent writer may have replaced it first)
                shutil.rmtree(entry, ignore_errors=True)
            os.rename(staging, entry)
            staging = None
        except OSError:
            pass  # another build stored the same step a moment earlier, or the store is not writable
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def _verifies(self, entry: Path, key: str) -> bool:
        try:
            data = json.loads((entry / self.ENTRY).read_text())
            if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("files"), dict):
                return False
            verify_files(entry, data["files"], where=self.ENTRY, remedy="building the step again",
                         error=ExportError)
        except (OSError, ValueError, ExportError):
            return False
        return True


def _copy_into_place(source: Path, directory: Path) -> None:
    staging = staging_dir(directory, error=ExportError)
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        commit_directory(staging, directory)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
