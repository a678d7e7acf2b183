"""The original, unmerged PyTorch model in fp32: what every engine is judged against.

The pipeline's only torch code besides the export itself; torch is imported
only when a build has PyTorch and a checkpoint (a device building from a bundle
uses the stored references instead).
"""

from __future__ import annotations

import numpy as np

from export.pipeline.sources import ModelSource


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class OriginalModel:
    """Outputs of the original model, computed batch by batch: `model(images) -> {task: array}`."""

    def __init__(self, source: ModelSource, tasks):
        import torch

        self.torch = torch
        self.model = source.original()
        self.tasks = tuple(tasks)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            out = self.model.predict(self.torch.from_numpy(images))
        return {t: out[t].numpy() for t in self.tasks}
