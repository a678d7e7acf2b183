"""A build's records, published as one set: the accuracy reports and `build.json`.

`build.json` is the commit point. The reports are first written under pending
names, then `build.json` (with every record's SHA-256), then renamed into place.
An interrupt before `build.json` leaves the previous set intact (the pending
files are dropped by the next run); an interrupt after it leaves pending files
that match `build.json`, which the next `check` or `build` renames into place
and says so. So a report never claims a result that `build.json` does not vouch for.
"""

from __future__ import annotations

import json
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
            # Only its file index matters here; a damaged option is refused by the read that follows.
            listed = dict(_read_record(build).get("files") or {})
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


# The options a check reads back from build.json, and what each must be: (may be None, smallest value) for a
# count, None for a path or text. A record edited by hand or damaged is refused here in one line, before any
# work, instead of failing as a TypeError deep in the evaluation after the engines have loaded.
CHECKED_OPTIONS = {
    "checkpoint": None, "eval_data": None, "tolerances": None, "from_bundle": None,
    "img_size": (True, 1), "eval_samples": (False, 1), "batch_size": (False, 1), "threads": (True, 1),
    "report_samples": (False, 0),
}


def _option_problem(value, rule) -> str:
    """What is wrong with a recorded option's value ('' when nothing)."""
    if rule is None:
        return "" if value is None or isinstance(value, str) else "not a path or text"
    optional, minimum = rule
    if value is None and optional:
        return ""
    # bool is an int to Python, and NaN, Infinity and 4.0 are floats: none of them is a count.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return f"not an integer >= {minimum}" + (" (or null)" if optional else "")
    return ""


def check_recorded_options(path: Path, options: dict) -> None:
    """Refuse, naming the file and the field, a recorded option a check uses that has the wrong type or range."""
    for name, rule in CHECKED_OPTIONS.items():
        if name not in options:  # records of older versions lack some; the build's default applies
            continue
        problem = _option_problem(options[name], rule)
        if problem:
            shown = json.dumps(options[name], allow_nan=True)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ExportError(f"{path}: options.{name} is {shown}, {problem}; the record is damaged: re-run "
                              "'mtlora-export build' with the same --out (finished steps are reused)")


def read_build_record(build: BuildDir) -> dict:
    """build.json of a build directory (plain JSON; anything else is refused with one line), its options
    that a check uses checked (`CHECKED_OPTIONS`)."""
    recorded = _read_record(build)
    check_recorded_options(build.record, recorded["options"])
    return recorded


def _read_record(build: BuildDir) -> dict:
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
