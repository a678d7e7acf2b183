"""PASCAL-Context multi-task data (the PASCAL_MT layout of the official MTLoRA code).

Layout under `root` (facts in /work/shared/data/pascal-mt/README.md)::

    JPEGImages/<id>.jpg
    ImageSets/Context/{train,val}.txt        one id per line
    semseg/VOC12/<id>.png                    else semseg/pascal-context/<id>.png; 21 classes, 255 ignore
    human_parts/<id>.mat                     PASCAL-Part annotation (struct `anno`)
    sal_distill/<id>.png                     grayscale, salient where value / 255 > 0.5
    normals_distill/<id>.png                 RGB, decoded 2 * v / 255 - 1
    pascal-context/trainval/<id>.mat         `LabelMap`: the 459-class context map (normals mask, edges)

Samples are dicts of numpy arrays at the image's resolution: `image` uint8
(H, W, 3); `semseg` uint8 (H, W); `human_parts` uint8 (H, W), 0 background,
1 head, 2 torso, 3 upper arm, 4 lower arm (with hand), 5 upper leg, 6 lower leg
(with foot), and all 255 when the image has no annotated person; `sal`
uint8 {0, 1}; `normals` float32 (H, W, 3) where pixels whose context class
carries no normal are exactly (0, 0, 0) (so `np.any(normals != 0, -1)` is the
valid mask); `edge` uint8 {0, 1}; `meta` = {'id', 'size'}.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtlora.data.preprocess import load_image
from mtlora.errors import ConfigError, DataError

# task -> output channels; the order is the fixed task order.
PASCAL_TASKS: dict[str, int] = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
PERSON_CLASS_INDEX = 15

# PASCAL-Part person part names -> the 6 part labels the paper uses (0 is background).
HUMAN_PART_LABELS: dict[str, int] = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "lfoot": 6, "lhand": 4, "llarm": 4,
    "llleg": 6, "luarm": 3, "luleg": 5, "mouth": 1, "neck": 2, "nose": 1, "rear": 1, "rebrow": 1,
    "reye": 1, "rfoot": 6, "rhand": 4, "rlarm": 4, "rlleg": 6, "ruarm": 3, "ruleg": 5, "torso": 2,
}  # fmt: skip

# PASCAL-Context classes that also exist in NYUD, the only pixels whose
# distilled normals are trusted (plus tvmonitor); every other pixel is ignored.
NORMALS_VALID_CONTEXT_CLASSES: frozenset[int] = frozenset({
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51,
    53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107,
    111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183,
    184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239,
    242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287,
    288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345,
    349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408,
    411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
})  # fmt: skip

_CONTEXT_DIR = os.path.join("pascal-context", "trainval")
# Folders each task reads, relative to the root.
_TASK_FOLDERS: dict[str, tuple[str, ...]] = {
    "semseg": ("semseg",),
    "human_parts": ("human_parts",),
    "sal": ("sal_distill",),
    "normals": ("normals_distill", _CONTEXT_DIR),
    "edge": (_CONTEXT_DIR,),
}


def _check_root(root: str) -> None:
    missing = [
        p
        for p in ("JPEGImages", os.path.join("ImageSets", "Context"))
        if not os.path.isdir(os.path.join(root, p))
    ]
    if missing:
        raise DataError(
            f"{root} is not a PASCAL_MT tree: missing {', '.join(m + '/' for m in missing)}; "
            "point the data root at the extracted PASCAL_MT folder"
        )


def available_tasks(root: str) -> dict[str, int]:
    """The PASCAL tasks whose label folders exist under `root`, in task order."""
    root = os.fspath(root)
    _check_root(root)
    return {
        task: channels
        for task, channels in PASCAL_TASKS.items()
        if all(os.path.isdir(os.path.join(root, folder)) for folder in _TASK_FOLDERS[task])
    }


def read_split(path: str) -> list[str]:
    """Image ids of a split file, one per line; blank lines are skipped."""
    if not os.path.isfile(path):
        raise DataError(f"split file not found: {path}; check the split name and the data root")
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise DataError(f"split file lists no images: {path}; the split is empty")
    return ids


def require_files(paths: Sequence[str], what: str) -> None:
    """Raise one DataError naming the first missing file and how many are missing."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{what} file not found: {missing[0]}{more}; the data set is incomplete")


def read_label_png(path: str) -> np.ndarray:
    """A single-channel PNG (palette indices or gray values) as an integer array (H, W)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L", "I", "I;16"):
                raise DataError(
                    f"label image has mode {img.mode}, expected one channel: {path}; re-export it"
                )
            return np.asarray(img).astype(np.int64)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read label image {path}: {exc}; re-copy the file") from exc


def _load_mat(path: str) -> dict:
    from scipy.io import loadmat  # scipy is a training dependency only

    try:
        return loadmat(path)
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError, TypeError...
        raise DataError(f"cannot read MATLAB file {path}: {exc}; re-copy the file") from exc


def _resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if labels.shape[:2] == shape:
        return labels
    image = Image.fromarray(labels.astype(np.int32))
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)).astype(labels.dtype)


def context_edges(label_map: np.ndarray) -> np.ndarray:
    """Class boundaries of a label map: non-zero 4-neighbour Laplacian, thinned to one pixel.

    The Laplacian uses mirrored borders (as OpenCV's default does). Thinning is
    Zhang-Suen, close to but not identical with scikit-image's `thin` that the
    official loader uses.
    """
    labels = np.pad(label_map.astype(np.int64), 1, mode="reflect")
    laplacian = (
        labels[:-2, 1:-1] + labels[2:, 1:-1] + labels[1:-1, :-2] + labels[1:-1, 2:] - 4 * labels[1:-1, 1:-1]
    )
    return thin(laplacian != 0).astype(np.uint8)


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a binary mask to one-pixel-wide lines.

    The border is replicated rather than zero-padded, so a line that runs off
    the image is not eaten back from the image edge.
    """
    img = np.pad(mask.astype(bool), 1, mode="edge")
    while True:
        changed = False
        for first_pass in (True, False):
            p2, p3, p4 = img[:-2, 1:-1], img[:-2, 2:], img[1:-1, 2:]
            p5, p6, p7 = img[2:, 2:], img[2:, 1:-1], img[2:, :-2]
            p8, p9 = img[1:-1, :-2], img[:-2, :-2]
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            count = sum(p.astype(np.int8) for p in ring[:-1])
            transitions = sum((~ring[i] & ring[i + 1]).astype(np.int8) for i in range(8))
            if first_pass:
                side = ~(p2 & p4 & p6) & ~(p4 & p6 & p8)
            else:
                side = ~(p2 & p4 & p8) & ~(p2 & p6 & p8)
            remove = img[1:-1, 1:-1] & (count >= 2) & (count <= 6) & (transitions == 1) & side
            if remove.any():
                img[1:-1, 1:-1] &= ~remove
                changed = True
        if not changed:
            return img[1:-1, 1:-1].copy()


def human_part_labels(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Person part labels (H, W) from a PASCAL-Part `.mat`; all 255 when no person has parts."""
    mat = _load_mat(path)
    target = None
    try:
        objects = mat["anno"][0][0][1]
        objects = objects[0] if objects.size else []
        for obj in objects:
            parts = obj[3]
            if int(np.asarray(obj[1]).ravel()[0]) != PERSON_CLASS_INDEX or len(parts) == 0:
                continue
            if target is None:
                target = np.zeros(np.asarray(obj[2]).shape, dtype=np.uint8)
            for part in parts[0]:
                name = str(np.asarray(part[0]).ravel()[0])
                if name not in HUMAN_PART_LABELS:
                    raise DataError(
                        f"unknown person part name {name!r} in {path}; expected one of PASCAL-Part's"
                    )
                target[np.asarray(part[1]).astype(bool)] = HUMAN_PART_LABELS[name]
    except DataError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise DataError(
            f"unexpected PASCAL-Part structure in {path} ({exc!r}); expected struct 'anno'"
        ) from exc
    if target is None or not target.any():
        return np.full(shape, 255, dtype=np.uint8)
    return _resize_nearest(target, shape)


class PascalContextMT:
    """PASCAL-Context multi-task samples (see the module docstring for the sample format).

    Every file the requested tasks need is checked when the data set is built,
    so a broken tree fails at once with the file it lacks.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", tasks: Sequence[str] | None = None):
        root = os.fspath(root)
        tasks = list(PASCAL_TASKS) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in PASCAL_TASKS]
        if unknown:
            raise ConfigError(
                f"PASCAL-Context has no task(s) {unknown}; available: {', '.join(PASCAL_TASKS)}"
            )
        _check_root(root)
        for task in tasks:
            for folder in _TASK_FOLDERS[task]:
                if not os.path.isdir(os.path.join(root, folder)):
                    raise DataError(
                        f"{root} lacks {folder}/, which task {task!r} needs; add it or drop the task"
                    )
        self.root = root
        self.split = split
        self.tasks = tasks
        self.ids = read_split(os.path.join(root, "ImageSets", "Context", f"{split}.txt"))
        require_files([self._image_path(i) for i in self.ids], "image")
        self._semseg_paths = [self._semseg_path(i) for i in self.ids] if "semseg" in tasks else []
        for task, paths in self._task_files().items():
            require_files(paths, f"{task} label")

    def _image_path(self, image_id: str) -> str:
        return os.path.join(self.root, "JPEGImages", f"{image_id}.jpg")

    def _semseg_path(self, image_id: str) -> str:
        voc = os.path.join(self.root, "semseg", "VOC12", f"{image_id}.png")
        return (
            voc
            if os.path.isfile(voc)
            else os.path.join(self.root, "semseg", "pascal-context", f"{image_id}.png")
        )

    def _context_path(self, image_id: str) -> str:
        return os.path.join(self.root, _CONTEXT_DIR, f"{image_id}.mat")

    def _task_files(self) -> dict[str, list[str]]:
        files = {
            "semseg": self._semseg_paths,
            "human_parts": [os.path.join(self.root, "human_parts", f"{i}.mat") for i in self.ids],
            "sal": [os.path.join(self.root, "sal_distill", f"{i}.png") for i in self.ids],
            "normals": [os.path.join(self.root, "normals_distill", f"{i}.png") for i in self.ids],
            "edge": [self._context_path(i) for i in self.ids],
        }
        if "normals" in self.tasks:
            files["context"] = files["edge"]
        return {task: paths for task, paths in files.items() if task in self.tasks or task == "context"}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = load_image(self._image_path(image_id), apply_exif_orientation=False)
        shape = image.shape[:2]
        sample: dict = {"image": image}
        label_map = None
        if "normals" in self.tasks or "edge" in self.tasks:
            path = self._context_path(image_id)
            mat = _load_mat(path)
            if "LabelMap" not in mat:
                raise DataError(f"{path} has no 'LabelMap' variable; expected a PASCAL-Context annotation")
            label_map = _resize_nearest(np.asarray(mat["LabelMap"]).astype(np.int64), shape)
        for task in self.tasks:
            if task == "semseg":
                sample[task] = self._semseg(self._semseg_paths[index], shape)
            elif task == "human_parts":
                sample[task] = human_part_labels(
                    os.path.join(self.root, "human_parts", f"{image_id}.mat"), shape
                )
            elif task == "sal":
                sample[task] = self._saliency(
                    os.path.join(self.root, "sal_distill", f"{image_id}.png"), shape
                )
            elif task == "normals":
                path = os.path.join(self.root, "normals_distill", f"{image_id}.png")
                sample[task] = self._normals(path, label_map, shape)
            elif task == "edge":
                sample[task] = context_edges(label_map)
        sample["meta"] = {"id": image_id, "size": shape}
        return sample

    @staticmethod
    def _semseg(path: str, shape: tuple[int, int]) -> np.ndarray:
        labels = read_label_png(path)
        bad = (labels >= PASCAL_TASKS["semseg"]) & (labels != 255)
        if bad.any():
            raise DataError(f"semseg label {int(labels[bad][0])} is outside 0..20 and not 255 in {path}")
        return _resize_nearest(labels.astype(np.uint8), shape)

    @staticmethod
    def _saliency(path: str, shape: tuple[int, int]) -> np.ndarray:
        try:
            with Image.open(path) as img:
                gray = np.asarray(img.convert("L"), dtype=np.float64)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read saliency map {path}: {exc}; re-copy the file") from exc
        return _resize_nearest((gray / 255.0 > 0.5).astype(np.uint8), shape)

    @staticmethod
    def _normals(path: str, label_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        try:
            with Image.open(path) as img:
                if img.size != (shape[1], shape[0]):
                    img = img.convert("RGB").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
                encoded = np.asarray(img.convert("RGB"), dtype=np.float32)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read normals map {path}: {exc}; re-copy the file") from exc
        normals = 2.0 * encoded / 255.0 - 1.0
        valid = np.isin(label_map, np.fromiter(NORMALS_VALID_CONTEXT_CLASSES, dtype=np.int64))
        normals[~valid] = 0.0
        return normals.astype(np.float32)
