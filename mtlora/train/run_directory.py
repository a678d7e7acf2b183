"""A run directory `OUT` and what it holds::

    OUT/model.safetensors, config.json, state.json   the final model (a checkpoint: load_checkpoint(OUT))
    OUT/metrics.jsonl                                one JSON record per epoch
    OUT/curves.png                                   losses and validation metrics
    OUT/best/                                        the best model by multi-task delta (or val loss)
    OUT/last/                                        model + optimizer state, for `--resume`

Every checkpoint directory is written beside its final name and renamed into
place, and the final OUT is assembled the same way, so a crash leaves the
previous complete version, never a truncated one. An `OUT` that holds
someone else's files, or another run, is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlora.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    commit_directory,
    read_config,
    save_checkpoint,
    staging_dir,
)
from mtlora.config import ModelConfig
from mtlora.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from mtlora.model import MultiTaskSwin
    from mtlora.train.config import TrainConfig
    from mtlora.train.state import ResumePoint


TRAINING_STATE_TENSORS = "training_state.safetensors"
TRAINING_STATE_JSON = "training_state.json"
LAST_DIR = "last"
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


# What a run directory holds (module docstring); anything else in `--out` is someone else's.
RUN_ENTRIES = frozenset({WEIGHTS_FILE, CONFIG_FILE, STATE_FILE, METRICS_FILE, CURVES_FILE, BEST_DIR,
                         LAST_DIR})
# Settings that change how a run is carried out, not what it trains: a restart may change them.
_RUN_MECHANICS = frozenset({"workers", "threads", "device", "eval_every", "eval_initial", "save_every", "slim"})


def _saved_run(out: Path) -> tuple[dict | None, dict | None]:
    """The model config and training settings of the run in `out`, as its checkpoints record them."""
    model, settings = None, None
    for directory in (out / LAST_DIR, out, out / BEST_DIR):
        if model is None and (directory / CONFIG_FILE).is_file():
            model = read_config(directory).to_dict()
        for name in (TRAINING_STATE_JSON, STATE_FILE):
            if settings is None and (directory / name).is_file():
                try:
                    saved = json.loads((directory / name).read_text())
                except (OSError, ValueError) as err:
                    raise CheckpointError(f"{directory / name}: unreadable ({err})") from None
                if isinstance(saved, dict) and isinstance(saved.get("train_config"), dict):
                    settings = saved["train_config"]
    return model, settings


def check_output_directory(out: Path, model_config: ModelConfig, config: TrainConfig,
                           resume_point: ResumePoint | None, force: bool) -> None:
    """Refuse an `out` whose contents this run would replace without being asked to.

    The finished run replaces `out` as a whole, so: files that are not a run's are never replaced; another
    run's checkpoint (another model or other settings) is replaced only with `force`. Resuming the run
    that lives in `out`, or restarting the same run, goes ahead as before.
    """
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # dot-names: our staging
    foreign = [name for name in entries if name not in RUN_ENTRIES]
    if foreign:
        raise ConfigError(f"--out {out}: holds files that are not a training run's ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}), which the finished run would replace; "
                          "choose a new or empty directory")
    if not entries or force:
        return
    if resume_point is not None and resume_point.path.resolve() in (out.resolve(), (out / LAST_DIR).resolve()):
        return
    hint = "pass --force to replace it, --resume it to continue it, or choose another --out"
    try:
        model, settings = _saved_run(out)
    except (CheckpointError, ConfigError) as err:
        raise ConfigError(f"--out {out}: holds a run that cannot be read ({err}); {hint}") from None
    if model is None and settings is None:
        raise ConfigError(f"--out {out}: holds the logs of a run without a checkpoint ({', '.join(entries)}); {hint}")
    ours = config.to_dict()
    differences = dict_diff(model_config.to_dict(), model) if model is not None else []
    if settings is not None:  # a setting the saved run predates is not a difference
        differences += [(k, ours[k], settings[k]) for k in ours
                        if k in settings and k not in _RUN_MECHANICS and dict_diff(ours[k], settings[k])]
    if differences:
        shown = "; ".join(f"{k}: {there!r} there, {here!r} here" for k, here, there in differences[:3])
        raise ConfigError(f"--out {out}: holds another run ({shown}); {hint}")


def dict_diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += dict_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def finish_run_directory(model: MultiTaskSwin, out: Path, state: dict, keep: tuple[str, ...]) -> None:
    """Put the final model at the top of `out`, keeping the named logs and checkpoints, in one rename.

    The new directory is assembled beside `out` (the kept entries hard-linked,
    so nothing is copied) and swapped in with `commit_directory`.
    """
    building = staging_dir(out)
    try:
        target = building / "run"
        save_checkpoint(model, target, state)
        for name in keep:
            source = out / name
            if source.is_dir():
                shutil.copytree(source, target / name, copy_function=_link_or_copy)
            elif source.is_file():
                _link_or_copy(source, target / name)
        commit_directory(target, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)


# Inside OUT, a dot-name (skipped by check_output_directory), so a crash cannot leave it beside OUT.
PREVIOUS_RUN_DIR = ".previous-run"


@contextlib.contextmanager
def restored_on_failure(out: Path):
    """A run that ends in an error leaves `out` as it found it: absent, or holding the previous run;
    except that a run which saved a `last/` checkpoint where no finished run was keeps it for `--resume`
    (hours of training are not thrown away for a bad sample in the last epoch).

    Every write into `out` is a rename (logs, curves, checkpoints), so hard links
    taken before the first write keep the previous files intact. An interrupted
    run (Ctrl-C, SIGTERM) is not an error: it keeps its `last/` for `--resume`.
    """
    existed = out.is_dir()
    finished_before = existed and (out / CONFIG_FILE).is_file()
    previous = out / PREVIOUS_RUN_DIR
    if existed:
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for name in RUN_ENTRIES:
            _keep(out / name, previous / name)
    try:
        yield
    except Exception as err:
        if not finished_before and _saved_a_checkpoint(out, previous):
            err.add_note(f"the last checkpoint is kept: continue with --resume {out / LAST_DIR}")
            raise
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for name in RUN_ENTRIES:
                _remove(out / name)
                if (previous / name).exists():
                    os.replace(previous / name, out / name)
        raise
    finally:
        shutil.rmtree(previous, ignore_errors=True)


def _saved_a_checkpoint(out: Path, previous: Path) -> bool:
    """Whether this run published a `last/` (a new directory: the old one, if any, is linked in `previous`)."""
    last = out / LAST_DIR / CONFIG_FILE
    if not last.is_file():
        return False
    kept = previous / LAST_DIR / CONFIG_FILE
    return not kept.is_file() or not os.path.samefile(last, kept)


def _keep(source: Path, destination: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, destination, copy_function=_link_or_copy)
    elif source.is_file():
        _link_or_copy(source, destination)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
