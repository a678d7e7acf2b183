"""A build's records, published as one set: the accuracy reports and `build.json`.

`build.json` is the commit point. The reports are first written under pending
names, then `build.json` (with every record's SHA-256), then renamed into place.
An interrupt before `build.json` leaves the previous set intact (the pending
files are dropped by the next run); an interrupt after it leaves pending files
that match `build.json`, which the next `check` or `build` renames into place
and says so. So a report never claims a result that `build.json` does not vouch for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from engines.files import sha256_file, verify_files
from export.artifacts.builddir import BuildDir
from export.artifacts.files import read_json, write_bytes_atomic, write_json_atomic
from export.errors import ExportError

PENDING = ".pending"


def _pending(build: BuildDir, name: str) -> Path:
    return build.root / f".{name}{PENDING}"


def publish_records(build: BuildDir, records: Mapping[str, bytes], record: dict, vouched: Mapping[str, Path]) -> None:
    """Write `records` ({file name: bytes}) and `build.json` (`record` plus the SHA-256 of every record
    and of each file in `vouched`, e.g. the evaluation set) as one set."""
    import hashlib

    for name, payload in records.items():
        write_bytes_atomic(_pending(build, name), payload)
    files = {name: hashlib.sha256(payload).hexdigest() for name, payload in records.items()}
    files.update({name: sha256_file(path) for name, path in vouched.items() if path.is_file()})
    write_json_atomic(build.record, {**record, "files": files})
    for name in records:
        _pending(build, name).replace(build.root / name)


def recover_records(build: BuildDir, say: Callable[[str], None]) -> None:
    """Finish or drop the records of an interrupted run (see the module docstring)."""
    pending = sorted(build.root.glob(f".*{PENDING}"))
    if not pending:
        return
    listed = {}
    if build.record.is_file():
        try:
            listed = dict(read_build_record(build).get("files") or {})
        except ExportError:
            listed = {}
    finished = []
    for path in pending:
        name = path.name[1:-len(PENDING)]
        if name in listed and sha256_file(path) == listed[name]:
            path.replace(build.root / name)
            finished.append(name)
        else:
            path.unlink(missing_ok=True)
    if finished:
        say(f"[build] finished publishing the records of an interrupted run: {', '.join(finished)}")
    else:
        say("[build] dropped the unfinished records of an interrupted run; the previous ones stand")


def read_build_record(build: BuildDir) -> dict:
    """build.json of a build directory (plain JSON; anything else is refused with one line)."""
    path = build.record
    if not path.is_file() and build.report.is_file():
        raise ExportError(f"{build.root}: has reports but no {BuildDir.RECORD}: the build was interrupted before "
                          "it finished; re-run 'mtlora-export build' with the same --out (finished steps are reused)")
    recorded = read_json(path, corrupt=f"{path}: corrupt",
                         missing=f"{build.root}: no {BuildDir.RECORD}; is this a build directory from "
                                 "'mtlora-export build' that finished?")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("options"), dict):
        raise ExportError(f"{path}: not a build record written by 'mtlora-export build'")
    if not isinstance(recorded.get("files", {}), dict):
        raise ExportError(f"{path}: its file index is corrupt; re-run the build")
    return recorded


def verify_records(build: BuildDir, recorded: dict) -> None:
    """Every file build.json vouches for (evaluation set, reports) is present and unmodified."""
    verify_files(build.root, recorded.get("files") or {}, where=BuildDir.RECORD, remedy="re-run the build",
                 error=ExportError)
