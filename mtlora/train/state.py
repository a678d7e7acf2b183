"""The training state of a `last/` checkpoint: the optimiser state beside the weights (safetensors and
JSON, no pickle), written atomically, and read back for `--resume` with every field checked first."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtlora.checkpoint import (
    commit_directory,
    load_weights,
    read_config,
    save_checkpoint,
    staging_dir,
    write_json_atomic,
)
from mtlora.config import ModelConfig
from mtlora.errors import CheckpointError, ConfigError
from mtlora.model import MultiTaskSwin
from mtlora.train.config import TrainConfig
from mtlora.train.run_directory import LAST_DIR, TRAINING_STATE_JSON, TRAINING_STATE_TENSORS
from mtlora_base.numbers import is_finite_number, is_integer

TRAINING_STATE_FORMAT = "mtlora-train/1"


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON, keyed by parameter name."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        name = names[index]
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "names": names}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: Mapping[str, torch.Tensor], meta: Mapping, source: str
) -> None:
    if list(meta.get("names", [])) != list(names):
        raise CheckpointError(
            f"{source}: the optimizer state belongs to another set of trainable parameters "
            "(a different adapter kind or model); start a new run instead of resuming"
        )
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        prefix, name, item = key.split("/", 2) if key.count("/") >= 2 else ("", "", "")
        if prefix != "optimizer" or name not in index:
            raise CheckpointError(f"{source}: unexpected optimizer tensor {key!r}")
        state.setdefault(index[name], {})[item] = value
    for name, values in meta.get("scalars", {}).items():
        if name not in index:
            raise CheckpointError(f"{source}: optimizer scalars for an unknown parameter {name!r}")
        state.setdefault(index[name], {}).update(values)
    groups = [dict(g) for g in meta["param_groups"]]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{source}: optimizer state does not fit ({err})") from None


def save_training_checkpoint(
    model: MultiTaskSwin,
    out: Path,
    extra_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    names: list[str] | None = None,
    training_state: dict[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """A checkpoint directory, optionally with the optimiser and trainer state beside the weights."""
    out = Path(out)
    building = staging_dir(out)
    try:
        # save_checkpoint is atomic on its own; we fill the directory it writes, then rename it in one step.
        target = building / "checkpoint"
        save_checkpoint(model, target, extra_state)
        if optimizer is not None:
            tensors, meta = optimizer_state_tensors(optimizer, names or [])
            save_file(tensors, str(target / TRAINING_STATE_TENSORS), metadata={"format": TRAINING_STATE_FORMAT})
            state = {"format": TRAINING_STATE_FORMAT, "optimizer": meta, **(training_state or {})}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            write_json_atomic(target / TRAINING_STATE_JSON, state)
        commit_directory(target, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out


def resolve_resume_dir(path: str | Path) -> Path:
    """A checkpoint with training state: the directory itself, or the `last/` of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint to resume from")
    for candidate in (path, path / LAST_DIR):
        if (candidate / TRAINING_STATE_JSON).is_file():
            return candidate
    raise CheckpointError(
        f"{path}: has no training state ({TRAINING_STATE_JSON}); resume from a run's '{LAST_DIR}/' "
        "checkpoint (a model-only checkpoint, e.g. best/ or a --slim run, cannot be resumed)"
    )


@dataclass
class ResumePoint:
    path: Path
    model_config: ModelConfig
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor]

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @property
    def train_config(self) -> dict[str, Any]:
        return dict(self.state["train_config"])


def read_resume_point(path: str | Path) -> ResumePoint:
    """The checkpoint to resume, every field of its training state checked before anything is written."""
    directory = resolve_resume_dir(path)
    source = directory / TRAINING_STATE_JSON
    try:
        state = json.loads(source.read_text())
    except (OSError, ValueError) as err:  # ValueError: also undecodable bytes
        raise CheckpointError(f"{source}: corrupt training state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise CheckpointError(f"{directory}: training state has an unknown format; expected {TRAINING_STATE_FORMAT}")
    problem = training_state_problem(state)
    if problem:
        raise CheckpointError(f"{source}: {problem}; the file is damaged or was edited: resume from an intact "
                              f"'{LAST_DIR}/' or start a new run")
    try:
        tensors = load_file(str(directory / TRAINING_STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{directory / TRAINING_STATE_TENSORS}: corrupt or missing ({err})") from None
    return ResumePoint(directory, read_config(directory), load_weights(directory), state, tensors)


# ----------------------------------------------------------------------------- training state validation


def _at(where: str, problem: str) -> str:
    """`where` followed by a problem that may itself start with a deeper path ('.key' or '[i]')."""
    return f"{where}{problem}" if problem.startswith((".", "[")) else f"{where} {problem}"


def _whole(minimum: int):
    def check(value: Any) -> str | None:
        if not is_integer(value):
            return f"must be a whole number, got {value!r}"
        return None if value >= minimum else f"must be >= {minimum}, got {value}"
    return check


def _number(minimum: float = -math.inf, maximum: float = math.inf, above: bool = False):
    def check(value: Any) -> str | None:
        if not is_finite_number(value):
            return f"must be a finite number, got {value!r}"
        low_ok = value > minimum if above else value >= minimum
        return None if low_ok and value <= maximum else f"is out of range, got {value}"
    return check


def _one_of(*choices: Any):
    return lambda value: None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {value!r}"


def _train_config(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must be an object, got {value!r}"
    if "epochs" not in value:  # the schedule the checkpoint's epoch is checked against
        return "has no 'epochs'"
    try:
        TrainConfig.from_dict(value)
    except (ConfigError, TypeError) as err:
        return str(err)
    return None


def _record(shape: dict[str, Any]):
    """An object with exactly these fields, each checked by its row."""
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be an object, got {value!r}"
        missing, unknown = sorted(set(shape) - set(value)), sorted(set(value) - set(shape))
        if missing or unknown:
            return f"must have the fields {', '.join(sorted(shape))}" + (
                f" (missing {', '.join(missing)})" if missing else f" (unknown {', '.join(unknown)})")
        for key, rule in shape.items():
            problem = rule(value[key])
            if problem:
                return _at(f".{key}", problem)
        return None
    return check


def _list_of(rule):
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"must be a list, got {value!r}"
        for i, item in enumerate(value):
            problem = rule(item)
            if problem:
                return _at(f"[{i}]", problem)
        return None
    return check


def _dict_of(rule):
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be an object, got {value!r}"
        for key, item in value.items():
            problem = rule(item)
            if problem:
                return _at(f".{key}", problem)
        return None
    return check


def _optional(rule):
    return lambda value: None if value is None else rule(value)


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {value!r}"


# The AdamW hyper-parameters a resumed optimiser takes over from its saved param group; other keys are torch's flags.
_PARAM_GROUP_FIELDS = {
    "lr": _number(0.0),
    "weight_decay": _number(0.0),
    "eps": _number(0.0, above=True),
    "betas": lambda v: None if isinstance(v, list) and len(v) == 2 and not any(_number(0.0, 1.0)(b) for b in v)
    and max(v) < 1 else f"must be two numbers in [0, 1), got {v!r}",
    "params": _list_of(_whole(0)),
}


def _param_group(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must be an object, got {value!r}"
    for key, rule in _PARAM_GROUP_FIELDS.items():
        problem = rule(value[key]) if key in value else "is missing"
        if problem:
            return _at(f".{key}", problem)
    return None


# Every field of training_state.json: (required, rule). The optimiser's hyper-parameters come back into
# AdamW on resume, so they are checked as strictly as the trainer's own counters.
TRAINING_STATE_FIELDS: dict[str, tuple[bool, Any]] = {
    "format": (True, _one_of(TRAINING_STATE_FORMAT)),
    "epoch": (True, _whole(0)),
    "step": (True, _whole(0)),
    "seconds": (False, _number(0.0)),
    "best": (False, _optional(_record({"epoch": _whole(0), "criterion": _one_of("delta_m", "val_loss"),
                                       "value": _number()}))),
    "train_config": (True, _train_config),
    "world_size": (False, _whole(1)),
    "optimizer": (True, _record({
        "names": _list_of(_string),
        "scalars": _dict_of(_dict_of(_number())),
        "param_groups": _list_of(_param_group),
    })),
    "scaler": (False, _record({"scale": _number(0.0, above=True), "growth_factor": _number(1.0, above=True),
                               "backoff_factor": _number(0.0, 1.0, above=True), "growth_interval": _whole(1),
                               "_growth_tracker": _whole(0)})),
}


def _non_finite(value: Any, where: str = "") -> str | None:
    """The first NaN or infinity anywhere in a JSON document (json.loads reads NaN and Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the document"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if found:
            return found
    return None


def training_state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a training_state.json document, in words, or None."""
    bad = _non_finite(state)
    if bad:
        return f"{bad.lstrip('.')} is not a finite number"
    unknown = sorted(set(state) - set(TRAINING_STATE_FIELDS))
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    for name, (required, rule) in TRAINING_STATE_FIELDS.items():
        if name not in state:
            if required:
                return f"the field {name!r} is missing"
            continue
        problem = rule(state[name])
        if problem:
            return _at(name, problem)
    epochs = state["train_config"]["epochs"]
    if state["epoch"] > epochs:
        return f"epoch {state['epoch']} lies beyond the run's schedule of {epochs} epochs"
    if state["step"] < state["epoch"]:
        return f"step {state['step']} is fewer than one optimiser step per finished epoch ({state['epoch']})"
    if state.get("best") and state["best"]["epoch"] > state["epoch"]:
        return f"best.epoch {state['best']['epoch']} is after the checkpoint's epoch {state['epoch']}"
    if len(state["optimizer"]["param_groups"]) != 2:
        return f"optimizer.param_groups must hold 2 groups (decay, no decay), got {len(state['optimizer']['param_groups'])}"
    return None
