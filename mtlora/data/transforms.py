"""Numpy transforms on sample dicts: training augmentation and the validation transform.

Input samples are what the loaders return (`image` uint8 `(H, W, 3)`, labels
in image layout, `meta`). Output samples are what the model and the losses
take:

    image        float32 (3, h, w)   via `preprocess` (identical to inference)
    semseg       int64   (h, w)      255 = ignore
    human_parts  int64   (h, w)      255 = ignore
    sal, edge    float32 (1, h, w)   {0, 1}
    normals      float32 (3, h, w)   unit vectors; ignored pixels are (0, 0, 0)
    depth        float32 (1, h, w)   metres; 0 = no measurement

The fixed resize to the model size is the official evaluation protocol
(scale-lab/MTLoRA `data/custom_transforms.py` FixedResize, AddIgnoreRegions,
ToTensor, Normalize), with OpenCV as upstream uses it: the image is resized
bicubically in float64, then made 8-bit by truncation; class maps, binary
maps and depth with nearest neighbour (OpenCV's INTER_NEAREST, which picks
floor(x * scale), not the pixel centre); normals bicubically, then
renormalised as N / (|N| + eps), so only pixels whose whole 4x4 neighbourhood
is unlabelled stay unlabelled. A human-parts map that is all background after
resizing is all ignore, as upstream's AddIgnoreRegions makes it.

One deliberate difference: upstream casts the resized float image to uint8
with `astype`, which wraps bicubic overshoot around (-3 becomes 253, 258
becomes 2); we clamp to [0, 255] first. Only pixels whose bicubic value falls
outside [0, 255] differ, and there ours is the nearest 8-bit value.

Augmentation follows the official recipe as well: random horizontal flip,
random scale and rotation about the image centre, then the fixed resize.
Class maps are resampled with nearest neighbour and the pixels that rotation
brings in from outside the image are 255 (upstream fills them with class 0,
which teaches "background" where there is no image); binary maps use nearest
with 0 fill; the image and continuous maps are bilinear. Normals and depth
are interpolated only from valid pixels, so a hole never bleeds into its
neighbours.

Normals live in the camera frame x right, y up, z towards the viewer: a
flip negates x, and rotating the image counter-clockwise by an angle rotates
the in-plane part (x, y) counter-clockwise by the same angle. Zooming in by a
factor s divides depth by s (the scene looks s times closer).

Randomness comes only from the `np.random.Generator` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mtlora.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from mtlora.errors import ConfigError
from mtlora.tasks import BINARY_MAP, CLASS_MAP, DEPTH, NORMALS, TASKS

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Augmentation:
    """Random training augmentation.

    `scale_choices`, when given, replaces the continuous `scale_range`
    (NYUD draws from {1.0, 1.2, 1.5}). Angles are in degrees, positive is
    counter-clockwise.
    """

    flip_probability: float = 0.5
    scale_range: tuple[float, float] = (0.75, 1.25)
    rotation_range: tuple[float, float] = (-20.0, 20.0)
    scale_choices: tuple[float, ...] | None = None

    def __post_init__(self):
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ConfigError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"scale_range must be 0 < low <= high, got {self.scale_range}")
        if self.rotation_range[0] > self.rotation_range[1]:
            raise ConfigError(
                f"rotation_range must be (low, high) with low <= high, got {self.rotation_range}"
            )
        if self.scale_choices is not None and (not self.scale_choices or min(self.scale_choices) <= 0):
            raise ConfigError(f"scale_choices must be positive numbers, got {self.scale_choices}")


PASCAL_AUGMENTATION = Augmentation()
NYUD_AUGMENTATION = Augmentation(rotation_range=(0.0, 0.0), scale_choices=(1.0, 1.2, 1.5))
NO_AUGMENTATION = Augmentation(flip_probability=0.0, scale_range=(1.0, 1.0), rotation_range=(0.0, 0.0))


def _known_keys() -> set[str]:
    return {"image", "meta", *(t.name for t in TASKS.values() if t.kind in LABEL_LAYOUTS)}


def _check_keys(sample: dict) -> None:
    known = _known_keys()
    unknown = sorted(set(sample) - known)
    if unknown:
        raise ConfigError(f"no transform for sample key(s) {unknown}; known: {sorted(known)}")


def _layout(key: str) -> LabelLayout:
    return LABEL_LAYOUTS[TASKS[key].kind]


def hflip(sample: dict) -> dict:
    """Mirror every map left-right; the normals' x component changes sign."""
    _check_keys(sample)
    out = {}
    for key, value in sample.items():
        if key == "meta":
            out[key] = value
            continue
        flipped = np.ascontiguousarray(value[:, ::-1])
        out[key] = flipped if key == "image" else _layout(key).flip(flipped)
    return out


def _warp_plane(plane: np.ndarray, coefficients, resample, fill) -> np.ndarray:
    image = Image.fromarray(plane)
    warped = image.transform(
        image.size, Image.Transform.AFFINE, coefficients, resample=resample, fillcolor=fill
    )
    return np.asarray(warped).copy()


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError(
            "resizing data set samples needs OpenCV, as the official MTLoRA loaders use it: "
            "pip install opencv-python-headless (part of the 'train' extra)"
        ) from None
    return cv2


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """An RGB uint8 image resized to `size = (h, w)` as upstream's FixedResize does, then clamped to 8 bits.

    OpenCV bicubic on the float64 image; the result is clamped to [0, 255] (upstream wraps it) and
    truncated to uint8 (as upstream's cast does).
    """
    height, width = int(size[0]), int(size[1])
    if image.shape[:2] == (height, width):
        return image.copy()
    cv2 = _cv2()
    resized = cv2.resize(image.astype(np.float64), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(resized, 0.0, 255.0).astype(np.uint8)


def resize_nearest(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A label map (H, W) resized with OpenCV's INTER_NEAREST, in float64 as upstream does; dtype kept."""
    height, width = int(size[0]), int(size[1])
    if labels.shape[:2] == (height, width):
        return labels.copy()
    cv2 = _cv2()
    return cv2.resize(labels.astype(np.float64), (width, height), interpolation=cv2.INTER_NEAREST).astype(labels.dtype)


def resize_normals(normals: np.ndarray, size: Sequence[int], renormalize: bool = True) -> np.ndarray:
    """Normals (H, W, 3) resized with OpenCV bicubic in their own float precision, as upstream does.

    With `renormalize` (upstream's FixedResize), then N / (|N| + eps): unlabelled (0, 0, 0) pixels stay
    zero only where the whole bicubic support was unlabelled.
    """
    height, width = int(size[0]), int(size[1])
    normals = normals if np.issubdtype(normals.dtype, np.floating) else normals.astype(np.float64)
    if normals.shape[:2] != (height, width):
        cv2 = _cv2()
        normals = cv2.resize(normals, (width, height), interpolation=cv2.INTER_CUBIC)
    else:
        normals = normals.copy()
    if renormalize:
        n1, n2, n3 = normals[..., 0], normals[..., 1], normals[..., 2]
        length = np.sqrt(n1**2 + n2**2 + n3**2) + np.finfo(float).eps
        normals = np.stack([n1 / length, n2 / length, n3 / length], axis=-1)
    return normals


def _resample_masked(values: np.ndarray, valid: np.ndarray, resample_fn) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling of `values` (H, W[, C]) that uses valid pixels only.

    Returns the resampled values (0 where invalid) and the new validity,
    which is the nearest-neighbour resampling of `valid`.
    """
    mask = valid.astype(np.float32)
    weight = resample_fn(mask, Image.Resampling.BILINEAR, 0.0)
    new_valid = resample_fn(valid.astype(np.uint8), Image.Resampling.NEAREST, 0) > 0
    channels = values[..., None] if values.ndim == 2 else values
    planes = []
    for c in range(channels.shape[-1]):
        plane = resample_fn((channels[..., c] * mask).astype(np.float32), Image.Resampling.BILINEAR, 0.0)
        planes.append(np.divide(plane, weight, out=np.zeros_like(plane), where=weight > 1e-6))
    out = np.stack(planes, axis=-1)
    new_valid &= weight > 1e-6
    out[~new_valid] = 0.0
    return (out[..., 0] if values.ndim == 2 else out), new_valid


def _unit_normals(normals: np.ndarray, valid: np.ndarray) -> np.ndarray:
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    valid = valid & (length[..., 0] > 1e-6)
    out = np.divide(normals, length, out=np.zeros_like(normals), where=valid[..., None])
    return out.astype(np.float32)


def _normals_valid(normals: np.ndarray) -> np.ndarray:
    return np.any(normals != 0, axis=-1)


def _depth_valid(depth: np.ndarray) -> np.ndarray:
    return np.isfinite(depth) & (depth > 0)


def _resample_sample(sample: dict, resample_fn) -> dict:
    """Apply one geometric resampling (`resample_fn(plane, filter, fill)`) to every map of a sample."""
    out = {}
    for key, value in sample.items():
        if key == "meta":
            out[key] = value
        elif key == "image":
            out[key] = resample_fn(value, Image.Resampling.BILINEAR, (0, 0, 0))
        else:
            out[key] = _layout(key).resample(value, resample_fn)
    return out


def scale_rotate(sample: dict, scale: float, angle: float) -> dict:
    """Zoom by `scale` and rotate by `angle` degrees (counter-clockwise) about the image centre.

    The output keeps the input size, as upstream's `ScaleNRotate` does.
    """
    if scale <= 0:
        raise ConfigError(f"scale must be positive, got {scale}")
    _check_keys(sample)
    if scale == 1.0 and angle == 0.0:
        return dict(sample)
    height, width = sample["image"].shape[:2]
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    # Pillow maps each output pixel to an input position; this is the inverse of
    # "rotate counter-clockwise on screen (y points down), then zoom".
    a, b, d, e = cos / scale, -sin / scale, sin / scale, cos / scale
    cx, cy = width / 2.0, height / 2.0
    coefficients = (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)

    def warp(plane, resample, fill):
        return _warp_plane(plane, coefficients, resample, fill)

    rotated = {key: value if key in ("image", "meta") else _layout(key).rotate(value, cos, sin)
               for key, value in sample.items()}
    out = _resample_sample(rotated, warp)
    return {key: value if key in ("image", "meta") else _layout(key).zoom(value, scale) for key, value in out.items()}


def resize_sample(sample: dict, size: Sequence[int], renormalize_normals: bool = True) -> dict:
    """Every map resized to `size = (h, w)` (aspect ratio not kept) by the official protocol (module doc).

    The image stays uint8; labels keep their dtype; normals are renormalised unless told not to.
    """
    _check_keys(sample)
    out = {}
    for key, value in sample.items():
        if key == "meta":
            out[key] = value
        elif key == "image":
            out[key] = resize_image(value, size)
        else:
            out[key] = _layout(key).resize(value, size, renormalize_normals)
    return out


def to_model_layout(
    sample: dict,
    size: Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict:
    """Resize to `size` (the official protocol, module doc) and convert to the layouts in the module docstring.

    The resized 8-bit image goes through `preprocess` (which then only normalises), so a validation
    input is bit-identical to what an engine receives for the same 8-bit image.
    """
    resized = resize_sample(sample, size)
    out = {"image": preprocess(resized.pop("image"), size, mean, std)}
    for key, value in resized.items():
        out[key] = value if key == "meta" else _layout(key).to_model(value, TASKS[key])
    return out


def _unchanged(value, *_):
    return value


def _resize_nearest(value, size, renormalize_normals):
    return resize_nearest(value, size)


@dataclass(frozen=True)
class LabelLayout:
    """How the transforms move one kind's label (image layout in, model layout out).

    flip(value) after a left-right mirror; rotate(value, cos, sin) before a rotation (vector labels turn
    with the image); resample(value, resample_fn) for a scale-and-rotate warp; zoom(value, scale) after
    it; resize(value, size, renormalize_normals) for the fixed resize; to_model(value, task) to the
    layout the model and the losses take.
    """

    resample: Callable
    to_model: Callable
    resize: Callable = _resize_nearest
    flip: Callable = _unchanged
    rotate: Callable = _unchanged
    zoom: Callable = _unchanged


LABEL_LAYOUTS: dict[str, LabelLayout] = {}


def register_label_layout(kind: str, layout: LabelLayout) -> LabelLayout:
    """The transforms move labels of tasks of `kind` as `layout` says."""
    LABEL_LAYOUTS[kind] = layout
    return layout


def _class_map_to_model(value: np.ndarray, task) -> np.ndarray:
    # Upstream's AddIgnoreRegions: a map without any part after resizing has no annotation.
    if task.empty_is_unlabelled and not value.any():
        return np.full(value.shape, IGNORE_INDEX, np.int64)
    return value.astype(np.int64)


def _flip_normals(normals: np.ndarray) -> np.ndarray:
    normals[..., 0] = np.where(normals[..., 0] != 0, -normals[..., 0], 0.0)
    return normals


def _rotate_normals(normals: np.ndarray, cos: float, sin: float) -> np.ndarray:
    normals = normals.astype(np.float32).copy()
    x, y = normals[..., 0].copy(), normals[..., 1].copy()
    normals[..., 0] = cos * x - sin * y
    normals[..., 1] = sin * x + cos * y
    return normals


def _resample_normals(value: np.ndarray, resample_fn) -> np.ndarray:
    normals = value.astype(np.float32)
    moved, valid = _resample_masked(normals, _normals_valid(normals), resample_fn)
    return _unit_normals(moved, valid)


def _resample_depth(value: np.ndarray, resample_fn) -> np.ndarray:
    depth = value.astype(np.float32)
    valid = _depth_valid(depth)
    moved, _ = _resample_masked(np.where(valid, depth, 0.0).astype(np.float32), valid, resample_fn)
    return moved.astype(np.float32)


register_label_layout(CLASS_MAP, LabelLayout(
    resample=lambda value, resample_fn: resample_fn(value.astype(np.uint8), Image.Resampling.NEAREST, IGNORE_INDEX),
    to_model=_class_map_to_model))
register_label_layout(BINARY_MAP, LabelLayout(
    resample=lambda value, resample_fn: resample_fn(value.astype(np.uint8), Image.Resampling.NEAREST, 0),
    to_model=lambda value, task: (value > 0).astype(np.float32)[None]))
register_label_layout(NORMALS, LabelLayout(
    resample=_resample_normals, flip=_flip_normals, rotate=_rotate_normals,
    resize=lambda value, size, renormalize: resize_normals(value, size, renormalize=renormalize),
    to_model=lambda value, task: np.ascontiguousarray(value.transpose(2, 0, 1), dtype=np.float32)))
register_label_layout(DEPTH, LabelLayout(
    resample=_resample_depth, zoom=lambda value, scale: (value / scale).astype(np.float32),
    to_model=lambda value, task: value.astype(np.float32)[None]))


@dataclass(frozen=True)
class ValTransform:
    """Resize and normalise only: the evaluation (and inference) view of a sample."""

    size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, sample: dict) -> dict:
        return to_model_layout(sample, self.size, self.mean, self.std)


@dataclass(frozen=True)
class TrainTransform:
    """Flip, scale and rotate at random, then `to_model_layout`."""

    size: tuple[int, int]
    augmentation: Augmentation = PASCAL_AUGMENTATION
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        aug = self.augmentation
        if rng.random() < aug.flip_probability:
            sample = hflip(sample)
        if aug.scale_choices is not None:
            scale = float(aug.scale_choices[int(rng.integers(len(aug.scale_choices)))])
        else:
            scale = float(rng.uniform(*aug.scale_range))
        angle = float(rng.uniform(*aug.rotation_range))
        sample = scale_rotate(sample, scale, angle)
        return to_model_layout(sample, self.size, self.mean, self.std)
