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
uint8 {0, 1}; `normals` float64 (H, W, 3) where pixels whose context class
carries no normal are exactly (0, 0, 0) (so `np.any(normals != 0, -1)` is the
valid mask); `edge` uint8 {0, 1}; `meta` = {'id', 'size'}.

Every label is made as the official loader (`data/mtl_ds.py` PASCALContext)
makes it, at the resolution of its file, and a label of another size than the
image is then resized to it the way that loader does (OpenCV nearest, bicubic
for normals): edges come from the context map at its own resolution, normals
are decoded and masked in float64.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtlora.data.preprocess import load_image
from mtlora.data.transforms import resize_nearest, resize_normals
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
    return labels if labels.shape[:2] == shape else resize_nearest(labels, shape)


def context_edges(label_map: np.ndarray) -> np.ndarray:
    """Class boundaries of a label map: non-zero 4-neighbour Laplacian, thinned to one pixel.

    The Laplacian uses mirrored borders, as OpenCV's `Laplacian` (which the
    official loader calls) does by default; the thinning is scikit-image's.
    """
    labels = np.pad(label_map.astype(np.int64), 1, mode="reflect")
    laplacian = (
        labels[:-2, 1:-1] + labels[2:, 1:-1] + labels[1:-1, :-2] + labels[1:-1, 2:] - 4 * labels[1:-1, 1:-1]
    )
    return thin(laplacian != 0).astype(np.uint8)


def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Which 8-neighbourhoods delete their centre in each subiteration of Guo and Hall's thinning.

    A neighbourhood is coded as 8 bits: east, north-east, north, north-west, west, south-west, south,
    south-east. Conditions G1 (one 8-connected component around the pixel), G2 (two or three
    neighbours in the sense of the paper) and G3 / G3' (the pixel is on the south-east / north-west side).
    """
    codes = np.arange(256)
    b = [((codes >> i) & 1).astype(bool) for i in range(8)]
    g1 = sum((~b[i] & (b[i + 1] | b[(i + 2) % 8])).astype(int) for i in (0, 2, 4, 6)) == 1
    n1 = sum((b[k] | b[k - 1]).astype(int) for k in (1, 3, 5, 7))
    n2 = sum((b[k] | b[(k + 1) % 8]).astype(int) for k in (1, 3, 5, 7))
    g2 = (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
    g3 = ~((b[1] | b[2] | ~b[7]) & b[0])
    g3_prime = ~((b[5] | b[6] | ~b[3]) & b[4])
    return g1 & g2 & g3, g1 & g2 & g3_prime


_THINNING_TABLES = _thinning_tables()
# (row offset, column offset, bit value) of each neighbour in the neighbourhood code.
_NEIGHBOUR_BITS = ((0, 1, 1), (-1, 1, 2), (-1, 0, 4), (-1, -1, 8), (0, -1, 16), (1, -1, 32), (1, 0, 64), (1, 1, 128))


def thin(mask: np.ndarray) -> np.ndarray:
    """Thinning of a binary mask to one-pixel-wide lines (Guo and Hall, 1989), as scikit-image's `thin`.

    Outside the image counts as background; both subiterations repeat until nothing changes.
    """
    skeleton = np.pad(np.asarray(mask, dtype=bool), 1)
    h, w = skeleton.shape[0] - 2, skeleton.shape[1] - 2
    count = -1
    while count != int(skeleton.sum()):
        count = int(skeleton.sum())
        for table in _THINNING_TABLES:
            code = np.zeros((h, w), dtype=np.int64)
            for dy, dx, bit in _NEIGHBOUR_BITS:
                code += bit * skeleton[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]
            skeleton[1:-1, 1:-1] &= ~table[code]
    return skeleton[1:-1, 1:-1].copy()


def human_part_labels(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Person part labels (H, W) from a PASCAL-Part `.mat`; all 255 when no person has parts."""
    mat = _load_mat(path)
    target = None
    try:
        objects = mat["anno"][0][0][1]
        objects = objects[0] if objects.size else []
        # Upstream labels parts only in images with a person of non-zero area (its object list cache).
        has_person = any(int(np.asarray(o[1]).ravel()[0]) == PERSON_CLASS_INDEX and np.asarray(o[2]).sum() > 0
                         for o in objects)
        for obj in objects if has_person else []:
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
        label_map = None  # at the annotation's own resolution
        if "normals" in self.tasks or "edge" in self.tasks:
            path = self._context_path(image_id)
            mat = _load_mat(path)
            if "LabelMap" not in mat:
                raise DataError(f"{path} has no 'LabelMap' variable; expected a PASCAL-Context annotation")
            label_map = np.asarray(mat["LabelMap"]).astype(np.int64)
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
                sample[task] = _resize_nearest(context_edges(label_map), shape)
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
                encoded = np.asarray(img.convert("RGB"), dtype=np.float64)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read normals map {path}: {exc}; re-copy the file") from exc
        if encoded.shape[:2] != label_map.shape:
            raise DataError(f"normals map {path} is {encoded.shape[1]}x{encoded.shape[0]}, its PASCAL-Context "
                            f"annotation {label_map.shape[1]}x{label_map.shape[0]}; they must match")
        normals = 2.0 * encoded / 255.0 - 1.0
        valid = np.isin(label_map, np.fromiter(NORMALS_VALID_CONTEXT_CLASSES, dtype=np.int64))
        normals[~valid] = 0.0
        # Upstream resizes a normals map of another size than the image bicubically (no renormalising here).
        return normals if normals.shape[:2] == shape else resize_normals(normals, shape, renormalize=False)
