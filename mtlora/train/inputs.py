"""What a run trains and on what: the model config with heads sized to the data set (or the resumed
checkpoint's), and the training and validation sets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from mtlora.config import ModelConfig
from mtlora.data.datasets import build_dataset, dataset_tasks
from mtlora.errors import ConfigError, DataError
from mtlora.train.config import TrainConfig
from mtlora.train.run_directory import dict_diff

if TYPE_CHECKING:
    from mtlora.train.state import ResumePoint


def check_tasks(data: str, root: str | None, tasks: tuple[str, ...]) -> dict[str, int]:
    """task -> channels of the data set; refuses a task the data set lacks."""
    available = dataset_tasks(data, root)
    missing = [t for t in tasks if t not in available]
    if missing:
        where = f" at {root}" if root else ""
        raise DataError(
            f"the {data} data set{where} has no labels for task(s) {', '.join(missing)}; "
            f"available: {', '.join(available) or 'none'}"
        )
    return available


def build_datasets(config: TrainConfig, model_config: ModelConfig):
    """The training and validation sets at the model's input size."""
    tasks = tuple(model_config.tasks)
    size = model_config.swin.img_size
    synthetic = config.data == "synthetic"
    train_set = build_dataset(
        config.data, config.data_root, config.train_split, tasks, size, train=True, seed=config.seed,
        **({"num_samples": config.train_samples} if synthetic else {}),
    )
    # The synthetic validation scenes stay fixed across seeds, so runs are comparable.
    val_set = build_dataset(
        config.data, config.data_root, config.val_split, tasks, size, train=False, seed=0,
        **({"num_samples": config.val_samples} if synthetic else {}),
    )
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if len(dataset) == 0:
            raise DataError(f"the {name} split of {config.data} is empty; check --data-root and the split files")
        dataset[0]  # fail now, with the loader's own message, rather than inside a worker later
    return train_set, val_set


def _check_resume_config(requested: ModelConfig | None, resumed: ModelConfig) -> None:
    if requested is None:
        return
    a, b = requested.to_dict(), resumed.to_dict()
    diffs = dict_diff(a, b)
    if diffs:
        raise ConfigError(
            "the model options differ from the checkpoint being resumed: "
            + "; ".join(f"{k}: {va!r} here, {vb!r} in the checkpoint" for k, va, vb in diffs[:4])
            + " (leave the model options out when resuming)"
        )


def with_data_channels(model_config: ModelConfig, channels: Mapping[str, int]) -> ModelConfig:
    """The config with each task's head sized to the data set's classes (NYUD semseg has 40, synthetic 6)."""
    data = model_config.to_dict()
    data["task_channels"] = {t: int(channels[t]) for t in model_config.tasks}
    return ModelConfig.from_dict(data)


def resolve_model_config(
    model_config: ModelConfig | None, config: TrainConfig, resume_point: ResumePoint | None
) -> ModelConfig:
    """The model to train: the requested one with heads sized to the data, or the resumed one."""
    if resume_point is not None:
        if model_config is not None:
            _check_resume_config(with_data_channels(model_config, resume_point.model_config.task_channels),
                                 resume_point.model_config)
        model_config = resume_point.model_config
    if model_config is None:
        raise ConfigError("train needs a model config, or a checkpoint to resume")
    channels = check_tasks(config.data, config.data_root, tuple(model_config.tasks))
    if resume_point is None:
        return with_data_channels(model_config, channels)
    wanted = {t: channels[t] for t in model_config.tasks}
    if model_config.task_channels != wanted:
        raise DataError(f"the checkpoint's heads {model_config.task_channels} do not fit the classes of "
                        f"the {config.data} data set {wanted}")
    return model_config
