"""One output frame: the model's input and each chosen task's picture side by side, at the model's size.

The input panel is the preprocessed frame turned back into RGB, so it shows exactly what the
engine saw. Task pictures use the palettes of the accuracy reports (`checking.visualize`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from export.artifacts.interface import ModelInterface
from export.checking.visualize import denormalize, render_output


def overlay_size(interface: ModelInterface, tasks: Sequence[str]) -> tuple[int, int]:
    """(width, height) of an overlay frame: one square panel for the input and one per task."""
    return interface.size * (1 + len(tasks)), interface.size


def compose(interface: ModelInterface, model_input: np.ndarray, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """model_input (3, size, size) normalised, outputs {task: one image's output} -> (size, (1 + T) size, 3) RGB."""
    panels = [denormalize(model_input, interface.mean, interface.std)]
    panels += [render_output(task, value, interface.kind(task)) for task, value in outputs.items()]
    return np.concatenate(panels, axis=1)
