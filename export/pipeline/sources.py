"""Where `build` gets its model: a checkpoint, the project's config file, a bundle, or the embedded default.

A `ModelSource` hashes its checkpoint once and loads it once per build: the
export step and the PyTorch reference share the loaded model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.artifacts.files import checkpoint_sha256, read_json
from export.errors import ExportError

PROJECT_CONFIG = "mtlora-export.json"
# A small MTLoRA Swin trained on the synthetic data set (`make default-model` re-creates it).
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "mtlora" / "assets" / "default"


def default_model_present() -> bool:
    return (DEFAULT_MODEL / "model.safetensors").is_file()


@dataclass
class ModelSource:
    """A checkpoint to build from, with one line for the user saying where it came from and why."""

    checkpoint: Path
    how: str
    img_size: int | None = None
    _sha256: str | None = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)
    _original: Any = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = checkpoint_sha256(self.checkpoint)
        return self._sha256

    def model(self):
        """The model as stored (merged or not), loaded on first use (needs PyTorch)."""
        if self._model is None:
            from mtlora.loading import load_any

            self._model = load_any(self.checkpoint, self.img_size)
        return self._model

    def original(self):
        """The original, unmerged model in fp32 and eval mode: what every engine is judged against."""
        if self._original is None:
            from mtlora.merge import is_merged, unmerge_model

            model = self.model()
            self._original = (unmerge_model(copy.deepcopy(model)) if is_merged(model) else model).float().eval()
        return self._original

    @property
    def curves_png(self) -> Path | None:
        curves = self.checkpoint / "curves.png"
        return curves if self.checkpoint.is_dir() and curves.is_file() else None


def read_project_config(directory: Path | None = None) -> tuple[Path, dict] | None:
    """`mtlora-export.json` in the working directory: defaults for build options, e.g.
    {"checkpoint": "runs/best", "precision": ["fp16"], "backend": ["auto"], "eval_data": "synthetic"}."""
    path = (directory or Path.cwd()) / PROJECT_CONFIG
    if not path.is_file():
        return None
    data = read_json(path, corrupt=f"{path}: not valid JSON")
    if not isinstance(data, dict):
        raise ExportError(f"{path}: must be a JSON object of build options")
    return path, data


def resolve_model(checkpoint: str | None, img_size: int | None = None) -> ModelSource:
    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise ExportError(f"{path}: no such checkpoint")
        return ModelSource(path, f"model: {path}", img_size)
    if not default_model_present():
        raise ExportError(f"no checkpoint given and the embedded default model is missing ({DEFAULT_MODEL}); "
                          "run 'make default-model' or pass a checkpoint")
    return ModelSource(DEFAULT_MODEL, "no checkpoint given: using the embedded default model "
                                      "(MTLoRA Swin trained on the synthetic data set)", img_size)
