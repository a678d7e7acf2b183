"""NYUD-v2 multi-task data (the NYUD_MT layout of the official MTLoRA code).

Layout under `root`::

    images/<id>.jpg (or .png)
    segmentation/<id>.png (or .npy)     0 = unlabelled, 1..40 = the 40 NYU classes
    normals/<id>.npy                    (H, W, 3) float; the zero vector where there is no normal
    depth/<id>.npy                      (H, W) float metres; 0 = no measurement
    edge/<id>.npy                       (H, W) {0, 1}
    gt_sets/{train,val}.txt             one id per line

As upstream (and related work) does, the unlabelled class is not learnt:
stored 0 becomes 255 (ignore) and classes 1..40 become 0..39.

Samples: `image` uint8 (H, W, 3); `semseg` uint8 (H, W); `normals` float
(H, W, 3) in the file's precision (float64 for integer files), ignored pixels
exactly (0, 0, 0); `depth` float32 (H, W), 0 where invalid (NaNs included);
`edge` uint8 {0, 1}; `meta` = {'id', 'size'}. Labels of another size than
the image are resized to it as the official loader (`data/mtl_ds.py` NYUD_MT)
does: OpenCV nearest, bicubic for normals.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mtlora.data.pascal import read_label_png, read_split, require_files
from mtlora.data.preprocess import load_image
from mtlora.data.transforms import resize_sample
from mtlora.errors import ConfigError, DataError

# task -> output channels; the order is the fixed task order.
NYUD_TASKS: dict[str, int] = {"semseg": 40, "normals": 3, "edge": 1, "depth": 1}
_TASK_FOLDERS = {"semseg": "segmentation", "normals": "normals", "edge": "edge", "depth": "depth"}


def _check_root(root: str) -> None:
    missing = [p for p in ("images", "gt_sets") if not os.path.isdir(os.path.join(root, p))]
    if missing:
        raise DataError(
            f"{root} is not a NYUD_MT tree: missing {', '.join(m + '/' for m in missing)}; "
            "point the data root at the extracted NYUD_MT folder"
        )


def available_tasks(root: str) -> dict[str, int]:
    """The NYUD tasks whose label folders exist under `root`, in task order."""
    root = os.fspath(root)
    _check_root(root)
    return {t: c for t, c in NYUD_TASKS.items() if os.path.isdir(os.path.join(root, _TASK_FOLDERS[t]))}


def _first_existing(candidates: Sequence[str]) -> str:
    for path in candidates:
        if os.path.isfile(path):
            return path
    return candidates[0]


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read numpy file {path}: {exc}; re-copy the file") from exc


class NYUDMT:
    """NYUD-v2 multi-task samples (see the module docstring for the sample format)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", tasks: Sequence[str] | None = None):
        root = os.fspath(root)
        tasks = list(NYUD_TASKS) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in NYUD_TASKS]
        if unknown:
            raise ConfigError(f"NYUD-v2 has no task(s) {unknown}; available: {', '.join(NYUD_TASKS)}")
        _check_root(root)
        for task in tasks:
            if not os.path.isdir(os.path.join(root, _TASK_FOLDERS[task])):
                raise DataError(
                    f"{root} lacks {_TASK_FOLDERS[task]}/, which task {task!r} needs; add it or drop the task"
                )
        self.root = root
        self.split = split
        self.tasks = tasks
        self.ids = read_split(os.path.join(root, "gt_sets", f"{split}.txt"))
        self._images = [self._path("images", i, (".jpg", ".png")) for i in self.ids]
        require_files(self._images, "image")
        self._labels = {}
        for task in tasks:
            suffixes = (".png", ".npy") if task == "semseg" else (".npy",)
            self._labels[task] = [self._path(_TASK_FOLDERS[task], i, suffixes) for i in self.ids]
            require_files(self._labels[task], f"{task} label")

    def _path(self, folder: str, image_id: str, suffixes: Sequence[str]) -> str:
        return _first_existing([os.path.join(self.root, folder, image_id + s) for s in suffixes])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image = load_image(self._images[index], apply_exif_orientation=False)
        shape = image.shape[:2]
        labels: dict = {}
        for task in self.tasks:
            path = self._labels[task][index]
            if task == "semseg":
                labels[task] = self._semseg(path)
            elif task == "normals":
                labels[task] = self._normals(path)
            elif task == "depth":
                labels[task] = self._depth(path)
            elif task == "edge":
                labels[task] = self._edge(path)
        # Labels stored at another size than the image (the official loader resizes them unnormalised).
        labels |= resize_sample({t: v for t, v in labels.items() if v.shape[:2] != shape}, shape,
                                renormalize_normals=False)
        return {"image": image} | labels | {"meta": {"id": self.ids[index], "size": shape}}

    @staticmethod
    def _semseg(path: str) -> np.ndarray:
        raw = read_label_png(path) if path.endswith(".png") else _load_npy(path).astype(np.int64)
        if raw.ndim != 2:
            raise DataError(f"segmentation must be a 2-D class map, got shape {raw.shape}: {path}")
        bad = (raw < 0) | (raw > NYUD_TASKS["semseg"])
        if bad.any():
            raise DataError(f"segmentation value {int(raw[bad][0])} is outside 0..40 in {path}")
        return np.where(raw == 0, 255, raw - 1).astype(np.uint8)

    @staticmethod
    def _normals(path: str) -> np.ndarray:
        normals = _load_npy(path)
        normals = normals.astype(normals.dtype if np.issubdtype(normals.dtype, np.floating) else np.float64)
        if normals.ndim == 3 and normals.shape[0] == 3 and normals.shape[2] != 3:
            normals = normals.transpose(1, 2, 0)
        if normals.ndim != 3 or normals.shape[2] != 3:
            raise DataError(f"normals must be (H, W, 3), got shape {normals.shape}: {path}")
        normals[~np.all(np.isfinite(normals), axis=-1)] = 0.0
        return normals

    @staticmethod
    def _depth(path: str) -> np.ndarray:
        depth = np.squeeze(_load_npy(path)).astype(np.float32)
        if depth.ndim != 2:
            raise DataError(f"depth must be (H, W), got shape {depth.shape}: {path}")
        return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)

    @staticmethod
    def _edge(path: str) -> np.ndarray:
        edge = np.squeeze(_load_npy(path))
        if edge.ndim != 2:
            raise DataError(f"edge map must be (H, W), got shape {edge.shape}: {path}")
        return (edge > 0.5).astype(np.uint8)
