"""Where `build` gets its model: a checkpoint, the project's config file, a bundle, or the embedded default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.artifacts.manifest import read_json
from export.errors import ExportError

PROJECT_CONFIG = "mtlora-export.json"
# A small MTLoRA Swin trained on the synthetic data set (`make default-model` re-creates it).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "mtlora" / "assets" / "default"


@dataclass(frozen=True)
class ModelSource:
    checkpoint: Path
    how: str  # one line for the user: where the model came from and why


def read_project_config(directory: Path | None = None) -> dict:
    """`mtlora-export.json` in the working directory: defaults for build options, e.g.
    {"checkpoint": "runs/best", "precision": ["fp16"], "backend": ["auto"], "eval_data": "synthetic"}."""
    path = (directory or Path.cwd()) / PROJECT_CONFIG
    if not path.is_file():
        return {}
    data = read_json(path, corrupt=f"{path}: not valid JSON")
    if not isinstance(data, dict):
        raise ExportError(f"{path}: must be a JSON object of build options")
    data["_path"] = str(path)
    return data


def resolve_model(checkpoint: str | None, project: dict) -> ModelSource:
    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise ExportError(f"{path}: no such checkpoint")
        return ModelSource(path, f"model: {path}")
    if project.get("checkpoint"):
        path = Path(project["_path"]).parent / project["checkpoint"]
        if not path.exists():
            raise ExportError(f"{project['_path']}: checkpoint {path} does not exist")
        return ModelSource(path, f"model: {path} (from {project['_path']})")
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        raise ExportError(f"no checkpoint given and the embedded default model is missing ({DEFAULT_MODEL}); "
                          "run 'make default-model' or pass a checkpoint")
    return ModelSource(DEFAULT_MODEL, "no checkpoint given: using the embedded default model "
                                      "(MTLoRA Swin trained on the synthetic data set)")
