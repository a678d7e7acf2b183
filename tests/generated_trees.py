"""Deterministic PASCAL_MT- and NYUD_MT-format trees, for checking our loaders against the official ones.

`write_pascal_tree(root, seed)` and `write_nyud_tree(root, seed)` write the same bytes for the same seed
(and the same Pillow, numpy and scipy): JPEG and PNG through Pillow with fixed settings, `.npy` through
numpy, `.mat` through scipy with its time-stamped header text replaced by a fixed one. The layouts
follow /work/shared/data/pascal-mt/README.md and the official NYUD_MT loader. Images have a mix of sizes
(smaller, larger and equal to 64x64, and not square) so that resizing to 64x64 both shrinks and enlarges.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

PASCAL_SIZES = {"2008_000101": (60, 80), "2008_000102": (50, 70), "2008_000103": (64, 64), "2008_000104": (96, 72)}
NYUD_SIZES = {"0101": (48, 64), "0102": (72, 96), "0103": (64, 64)}
# PASCAL-Context classes: some carry normals (in NORMALS_VALID_CONTEXT_CLASSES), some do not.
CONTEXT_WITH_NORMALS = (3, 9, 15, 59, 104, 284)
CONTEXT_WITHOUT_NORMALS = (2, 5, 25, 45, 458)
PART_NAMES = ("head", "hair", "torso", "neck", "luarm", "llarm", "lhand", "ruarm", "rlarm", "luleg", "llleg",
              "lfoot", "ruleg", "rlleg", "rfoot")
_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by tests/generated_trees.py".ljust(116, b" ")


def _write_mat(path: Path, variables: dict) -> None:
    buffer = io.BytesIO()
    savemat(buffer, variables, do_compression=False)
    data = bytearray(buffer.getvalue())
    data[:116] = _MAT_HEADER  # scipy writes the creation time here
    path.write_bytes(bytes(data))


def _blobs(rng: np.random.Generator, shape: tuple[int, int], labels: list[int], count: int) -> np.ndarray:
    """A label map: a background label and `count` ellipses and rectangles of the other labels."""
    h, w = shape
    out = np.full(shape, labels[0], dtype=np.int64)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(count):
        label = int(rng.choice(labels[1:]))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 10, h / 3), rng.uniform(w / 10, w / 3)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        out[mask] = label
    return out


def _image(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Flat colours per region, a gradient and noise, with hard edges (so cubic resizing overshoots)."""
    h, w = labels.shape
    palette = rng.integers(0, 256, size=(int(labels.max()) + 1, 3))
    image = palette[labels].astype(np.float64)
    image += np.linspace(-30, 30, w)[None, :, None] + rng.normal(0, 12, size=(h, w, 3))
    image[rng.random((h, w)) < 0.02] = 255.0  # specks: the strongest overshoot
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _unit_normals(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    n = np.stack([np.sin(3 * xx + rng.uniform(0, 6)), np.cos(2 * yy + rng.uniform(0, 6)), np.full((h, w), 1.5)], -1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def write_parts_mat(path: Path, objects: list) -> None:
    """A PASCAL-Part `anno` struct: objects are (class index, mask, [(part name, mask), ...])."""
    records = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (class_index, mask, parts) in enumerate(objects):
        if parts:
            part_records = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (name, part_mask) in enumerate(parts):
                part_records[0, j]["part_name"] = name
                part_records[0, j]["mask"] = part_mask.astype(np.uint8)
        else:
            part_records = np.zeros((0, 0))
        records[0, i]["class"] = "person" if class_index == 15 else "object"
        records[0, i]["class_ind"] = np.array([[class_index]])
        records[0, i]["mask"] = mask.astype(np.uint8)
        records[0, i]["parts"] = part_records
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0]["imname"] = path.stem
    anno[0, 0]["objects"] = records
    _write_mat(path, {"anno": anno})


def _person(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, list]:
    """A person's instance mask and part masks (a column of head, torso, arms, legs)."""
    h, w = shape
    top, left = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 2))
    height, width = int(rng.integers(h // 2, h - top)), int(rng.integers(w // 5, w // 2))
    mask = np.zeros(shape, bool)
    mask[top:top + height, left:left + width] = True
    parts = []
    bands = np.array_split(np.arange(top, top + height), 5)
    for name, rows in zip(("head", "torso", "luarm", "llleg", "rfoot"), bands, strict=True):
        part = np.zeros(shape, bool)
        part[rows[0]:rows[-1] + 1, left:left + width] = True
        if name in ("luarm", "llleg"):
            part[:, left + width // 2:] = False  # leave some person pixels without a part
        parts.append((name if rng.random() < 0.7 else str(rng.choice(PART_NAMES)), part))
    return mask, parts


def write_pascal_tree(root: str | Path, seed: int = 0) -> Path:
    """A PASCAL_MT tree with a `val` split of four images (and a one-image `train` split)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "ImageSets/Context", "ImageSets/Parts", "semseg/VOC12", "semseg/pascal-context", "human_parts",
                   "sal_distill", "normals_distill", "pascal-context/trainval"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = list(PASCAL_SIZES)
    (root / "ImageSets/Context/val.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets/Context/train.txt").write_text(ids[0] + "\n")
    voc_of_context = {c: k % 21 for k, c in enumerate(CONTEXT_WITH_NORMALS + CONTEXT_WITHOUT_NORMALS)}
    for n, image_id in enumerate(ids):
        shape = PASCAL_SIZES[image_id]
        context = _blobs(rng, shape, [CONTEXT_WITHOUT_NORMALS[0], *CONTEXT_WITH_NORMALS, *CONTEXT_WITHOUT_NORMALS[1:]], 7)
        _write_mat(root / f"pascal-context/trainval/{image_id}.mat", {"LabelMap": context.astype(np.uint16)})
        Image.fromarray(_image(rng, context)).save(root / f"JPEGImages/{image_id}.jpg", quality=90)
        semseg = np.vectorize(voc_of_context.get)(context).astype(np.uint8)
        semseg[rng.random(shape) < 0.03] = 255
        # VOC12 first, else pascal-context: both folders are used.
        folder = "VOC12" if n % 2 == 0 else "pascal-context"
        Image.fromarray(semseg, mode="L").convert("P").save(root / f"semseg/{folder}/{image_id}.png")
        sal = np.clip(rng.normal(128, 60, size=shape), 0, 255).astype(np.uint8)
        sal[: shape[0] // 3] = 127  # 127 / 255 < 0.5 <= 128 / 255
        sal[shape[0] // 3: shape[0] // 2] = 128
        Image.fromarray(sal, mode="L").save(root / f"sal_distill/{image_id}.png")
        normals = _unit_normals(rng, shape)
        Image.fromarray(np.rint((normals + 1) * 255 / 2).astype(np.uint8)).save(root / f"normals_distill/{image_id}.png")
        car = _blobs(rng, shape, [0, 1], 1).astype(bool)
        if n == 1:  # no person at all: every part label is ignored
            objects = [(7, car, [])]
        elif n == 3:  # a person without part annotation, and one with
            mask, parts = _person(rng, shape)
            objects = [(15, car, []), (15, mask, parts)]
        else:
            mask, parts = _person(rng, shape)
            objects = [(7, car, []), (15, mask, parts)]
        write_parts_mat(root / f"human_parts/{image_id}.mat", objects)
    return root


def write_nyud_tree(root: str | Path, seed: int = 0) -> Path:
    """A NYUD_MT tree with a `val` split of three images (and a one-image `train` split)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for folder in ("images", "segmentation", "normals", "depth", "edge", "gt_sets"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = list(NYUD_SIZES)
    (root / "gt_sets/val.txt").write_text("\n".join(ids) + "\n")
    (root / "gt_sets/train.txt").write_text(ids[0] + "\n")
    for image_id in ids:
        shape = NYUD_SIZES[image_id]
        classes = _blobs(rng, shape, [0, 1, 5, 12, 23, 39, 40], 8)  # 0 = unlabelled
        Image.fromarray(_image(rng, classes)).save(root / f"images/{image_id}.jpg", quality=90)
        Image.fromarray(classes.astype(np.uint8), mode="L").save(root / f"segmentation/{image_id}.png")
        normals = _unit_normals(rng, shape).astype(np.float32)
        normals[classes == 0] = 0.0  # no normal where unlabelled
        np.save(root / f"normals/{image_id}.npy", normals)
        depth = rng.uniform(0.5, 8.0, size=shape).astype(np.float32)
        depth[rng.random(shape) < 0.05] = 0.0  # no measurement
        np.save(root / f"depth/{image_id}.npy", depth)
        edge = np.zeros(shape, np.float32)
        edge[:, 1:] = classes[:, 1:] != classes[:, :-1]
        edge[1:, :] = np.maximum(edge[1:, :], classes[1:, :] != classes[:-1, :])
        np.save(root / f"edge/{image_id}.npy", edge)
    return root


def tree_digest(root: str | Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
