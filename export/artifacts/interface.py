"""What a caller needs to feed a model and read its outputs: the model interface (torch-free).

One typed object for what the export manifest, engine.json, the report and the
public engine API all state: the tasks in output order, each task's output
channels, the square input size and the normalisation. It crosses files as a
dict (`to_dict` / `from_dict`) and is checked when read back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.errors import ExportError
from mtlora.tasks import KINDS, TASKS, kind_of


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
    def from_dict(cls, data: Any, where: str) -> ModelInterface:
        """Read and check the dict `to_dict` wrote; anything else is one ExportError naming `where`."""
        try:
            tasks = tuple(data["tasks"])
            channels = {str(t): int(c) for t, c in dict(data["output_channels"]).items()}
            interface = cls(tasks, channels, int(data["input_size"]), tuple(float(v) for v in data["mean"]),
                            tuple(float(v) for v in data["std"]), bool(data.get("postprocessed", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise ExportError(f"{where}: the model description is incomplete ({type(err).__name__}: {err}); "
                              "rebuild it with this version") from None
        interface.check(where)
        return interface

    def check(self, where: str) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown or set(self.tasks) != set(self.channels):
            raise ExportError(f"{where}: describes tasks {list(self.tasks)} with channels {dict(self.channels)}; "
                              f"known tasks are {', '.join(TASKS)}")
        if any(c < 1 for c in self.channels.values()) or self.size < 1 or len(self.mean) != 3 or len(self.std) != 3:
            raise ExportError(f"{where}: the model description has impossible sizes; rebuild it")

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
