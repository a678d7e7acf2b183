"""What a caller needs to feed a model and read its outputs: the model interface (torch-free).

One typed object for what the export manifest, engine.json, the report and the
public engine API all state: the tasks in output order, each task's output
channels, the square input size and the normalisation. It crosses files as a
dict (`to_dict` / `from_dict`) and is checked when read back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.errors import ExportError
from mtlora.tasks import KINDS, TASKS, kind_of
from mtlora_base.numbers import is_finite_number, is_integer

# An image side under this carries nothing the model can use; upscaling it silently would hide a mistake
# (an image, a video's or a camera's frames alike).
MIN_IMAGE_SIDE = 8
# Bounds of a model description read back from a file, far beyond any real model (Swin is trained at 224
# to 448 pixels; a data set has tens of classes) and far below what would exhaust memory or overflow.
MAX_INPUT_SIZE = 8192
MAX_CHANNELS = 4096
# Pixels are scaled to [0, 1] before normalising, so a channel's mean lies in it; a std under 1e-3 would
# push inputs past fp16's range (65504), and one over 1e3 flattens every image to about zero.
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (1e-3, 1e3)


@dataclass(frozen=True)
class ModelInterface:
    """tasks: output order; channels: task -> output channels; size: input H = W; mean / std: per RGB channel."""

    tasks: tuple[str, ...]
    channels: Mapping[str, int]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    postprocessed: bool = False  # outputs post-processed in the graph (class ids, probabilities, unit normals)

    def to_dict(self) -> dict[str, Any]:
        out = {"tasks": list(self.tasks), "output_channels": dict(self.channels), "input_size": self.size,
               "mean": list(self.mean), "std": list(self.std)}
        if self.postprocessed:
            out["postprocessed"] = True
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str, remedy: str = "rebuild it") -> ModelInterface:
        """Read and check the dict `to_dict` wrote: every field's type and range, as nothing downstream
        checks them again (a size of 10^12 reaches numpy, a NaN mean every output). Anything else is one
        ExportError naming `where`, the field, and `remedy` (what to do)."""

        def bad(name: str, value: Any, wanted: str) -> ExportError:
            return ExportError(f"{where}: the model's {name} is {_shown(value)}, not {wanted}; {remedy}")

        if not isinstance(data, Mapping):
            raise bad("description", data, "a JSON object")
        missing = [k for k in ("tasks", "output_channels", "input_size", "mean", "std") if k not in data]
        if missing:
            raise ExportError(f"{where}: the model description lacks {', '.join(missing)}; {remedy}")
        tasks = data["tasks"]
        if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise bad("tasks", tasks, "a list of task names")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or len(set(tasks)) != len(tasks):
            raise bad("tasks", tasks, f"distinct known tasks ({', '.join(TASKS)})")
        channels = data["output_channels"]
        if not isinstance(channels, Mapping) or set(channels) != set(tasks):
            raise bad("output_channels", channels, f"a channel count for each of its tasks {', '.join(tasks)}")
        for task in tasks:
            if not _whole(channels[task], 1, MAX_CHANNELS):
                raise bad(f"output_channels.{task}", channels[task], f"a whole number from 1 to {MAX_CHANNELS}")
        if not _whole(data["input_size"], 1, MAX_INPUT_SIZE):
            raise bad("input_size", data["input_size"], f"a whole number of pixels from 1 to {MAX_INPUT_SIZE}")
        for name, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
            values = data[name]
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                raise bad(name, values, "a list of 3 numbers, one per RGB channel")
            for i, v in enumerate(values):
                if not is_finite_number(v) or not low <= v <= high:
                    raise bad(f"{name}[{i}]", v, f"a finite number from {low:g} to {high:g}")
        postprocessed = data.get("postprocessed", False)
        if not isinstance(postprocessed, bool):
            raise bad("postprocessed", postprocessed, "true or false")
        return cls(tuple(tasks), {t: channels[t] for t in tasks}, data["input_size"],
                   tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]), postprocessed)

    def kind(self, task: str) -> str:
        """The kind of a task's output here (`mtlora.tasks`): as trained, or post-processed."""
        return kind_of(task, self.postprocessed)

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """task -> shape of one image's output: (C, H, W), or (H, W) for post-processed class ids."""
        return {t: (self.channels[t], self.size, self.size) if KINDS[self.kind(t)].has_channels
                else (self.size, self.size) for t in self.tasks}

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """An (H, W, 3) uint8 RGB image -> the (3, size, size) float32 input, exactly as at inference."""
        from mtlora.data.preprocess import preprocess

        return preprocess(image, size=(self.size, self.size), mean=self.mean, std=self.std).astype(np.float32)

    def same_model(self, other: ModelInterface) -> bool:
        return self.tasks == other.tasks and dict(self.channels) == dict(other.channels) and self.size == other.size


def _whole(value: Any, low: int, high: int) -> bool:
    """An integer from `low` to `high`; JSON's true and false are not numbers, nor is 64.0 a count."""
    return is_integer(value) and low <= value <= high


def _shown(value: Any) -> str:
    """A value as its file has it, cut to a few characters (a hostile file may hold megabytes)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
