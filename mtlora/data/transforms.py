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

Augmentation is the official recipe (`RandomHorizontalFlip`, `ScaleNRotate`,
then the fixed resize above) with upstream's OpenCV calls: one affine map,
`cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)`, for every map, applied
with `cv2.warpAffine`; the image (in float64, so its bicubic overshoot reaches
the resize as upstream's does) and normals bicubically, every other label with
nearest neighbour; pixels brought in from outside the image are 0 (no
normal, no depth, not salient, no edge). Zooming in by a factor s divides
depth by s (the scene looks s times closer).

One more deliberate difference, besides the clamp: class maps (semseg, human
parts) get 255 (ignore) where rotation or zooming out brings pixels in from
outside the image; upstream fills them with class 0, which teaches
"background" on padding the model never sees at evaluation. Every other
pixel is upstream's. A human-parts map with no part left (nothing but
background and that padding) is all ignore, as upstream's AddIgnoreRegions
makes a map of only background.

Normals are in the NYU convention that the PASCAL-Context and NYUD labels
follow: x right, y down, z towards the camera. A flip negates x; rotating the
image counter-clockwise (on screen) by an angle turns each normal's in-plane
part counter-clockwise on screen too, which in these axes is
(x, y) -> (x cos + y sin, -x sin + y cos), as upstream's ScaleNRotate does.

Randomness comes only from the `np.random.Generator` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

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


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError(
            "resizing and augmenting data set samples needs OpenCV, as the official MTLoRA loaders use it: "
            "pip install opencv-python-headless (part of the 'train' extra)"
        ) from None
    return cv2


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """An RGB image resized to `size = (h, w)` as upstream's FixedResize does, then clamped to 8 bits.

    OpenCV bicubic on the image in float64 (uint8 from a loader, or float64 from augmentation); the result
    is clamped to [0, 255] (upstream wraps it) and truncated to uint8 (as upstream's cast does).
    """
    height, width = int(size[0]), int(size[1])
    if image.shape[:2] == (height, width):
        resized = image
    else:
        cv2 = _cv2()
        resized = cv2.resize(image.astype(np.float64), (width, height), interpolation=cv2.INTER_CUBIC)
    return image.copy() if resized.dtype == np.uint8 else np.clip(resized, 0.0, 255.0).astype(np.uint8)


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


# Interpolations a label layout may ask the warp for, as upstream's flag values name them.
NEAREST, LINEAR, CUBIC = "nearest", "linear", "cubic"


def _warp_function(matrix: np.ndarray, width: int, height: int) -> Callable:
    """`warp(plane, interpolation, fill)`: one map through upstream's affine warp, same size out."""
    cv2 = _cv2()
    flags = {NEAREST: cv2.INTER_NEAREST, LINEAR: cv2.INTER_LINEAR, CUBIC: cv2.INTER_CUBIC}

    def warp(plane: np.ndarray, interpolation: str, fill: float) -> np.ndarray:
        if interpolation not in flags:
            raise ConfigError(f"unknown interpolation {interpolation!r}; known: {sorted(flags)}")
        return cv2.warpAffine(plane, matrix, (width, height), flags=flags[interpolation],
                              borderMode=cv2.BORDER_CONSTANT, borderValue=fill)

    return warp


def scale_rotate(sample: dict, scale: float, angle: float) -> dict:
    """Zoom by `scale` and rotate by `angle` degrees (counter-clockwise on screen) about the image centre.

    Upstream's `ScaleNRotate` with that one scale and angle (module doc): same size out, the image as
    float64 (unclamped, for the resize), labels in their own dtypes.
    """
    if scale <= 0:
        raise ConfigError(f"scale must be positive, got {scale}")
    _check_keys(sample)
    if scale == 1.0 and angle == 0.0:
        return dict(sample)
    height, width = sample["image"].shape[:2]
    # Upstream's centre (w / 2, h / 2), not the middle pixel ((w - 1) / 2): the same map, not a shifted one.
    matrix = _cv2().getRotationMatrix2D((width / 2, height / 2), float(angle), float(scale))
    warp = _warp_function(matrix, width, height)
    theta = np.deg2rad(angle)
    out = {}
    for key, value in sample.items():
        if key == "meta":
            out[key] = value
        elif key == "image":
            out[key] = warp(value.astype(np.float64), CUBIC, 0.0)
        else:
            layout = _layout(key)
            moved = layout.resample(layout.rotate(value, math.cos(theta), math.sin(theta)), warp)
            out[key] = layout.zoom(moved, scale)
    return out


def resize_sample(sample: dict, size: Sequence[int], renormalize_normals: bool = True) -> dict:
    """Every map resized to `size = (h, w)` (aspect ratio not kept) by the official protocol (module doc).

    The image comes out uint8 (`resize_image`); labels keep their dtype; normals are renormalised unless
    told not to.
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
    with the image); resample(value, warp) for the scale-and-rotate warp, where `warp(plane, interpolation,
    fill)` takes NEAREST, LINEAR or CUBIC and the value for pixels from outside; zoom(value, scale) after
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
    # Upstream's AddIgnoreRegions: a map without any part after resizing has no annotation. Ignore
    # counts as no part too: augmentation pads with it where upstream pads with background.
    if task.empty_is_unlabelled and not ((value != 0) & (value != IGNORE_INDEX)).any():
        return np.full(value.shape, IGNORE_INDEX, np.int64)
    return value.astype(np.int64)


def _flip_normals(normals: np.ndarray) -> np.ndarray:
    normals[..., 0] = np.where(normals[..., 0] != 0, -normals[..., 0], 0.0)
    return normals


def _rotate_normals(normals: np.ndarray, cos: float, sin: float) -> np.ndarray:
    # y points down: a counter-clockwise turn on screen is clockwise in (x, y), as upstream turns them.
    normals = normals.copy() if np.issubdtype(normals.dtype, np.floating) else normals.astype(np.float64)
    x, y = normals[..., 0].copy(), normals[..., 1].copy()
    normals[..., 0] = cos * x + sin * y
    normals[..., 1] = cos * y - sin * x
    return normals


def _warp_map(value: np.ndarray, warp, fill: int) -> np.ndarray:
    # In float64, as upstream's loaders hand maps over: OpenCV's nearest warp of any other dtype puts a
    # few pixels on the other side of a tie. (Depth and normals warp in the dtype they arrive in, as
    # upstream warps what np.load gives.)
    return warp(value.astype(np.float64), NEAREST, float(fill)).astype(value.dtype)


register_label_layout(CLASS_MAP, LabelLayout(
    resample=lambda value, warp: _warp_map(value, warp, IGNORE_INDEX),
    to_model=_class_map_to_model))
register_label_layout(BINARY_MAP, LabelLayout(
    resample=lambda value, warp: _warp_map(value, warp, 0),
    to_model=lambda value, task: (value > 0).astype(np.float32)[None]))
register_label_layout(NORMALS, LabelLayout(
    resample=lambda value, warp: warp(value, CUBIC, 0.0), flip=_flip_normals, rotate=_rotate_normals,
    resize=lambda value, size, renormalize: resize_normals(value, size, renormalize=renormalize),
    to_model=lambda value, task: np.ascontiguousarray(value.transpose(2, 0, 1), dtype=np.float32)))
register_label_layout(DEPTH, LabelLayout(
    resample=lambda value, warp: warp(value, NEAREST, 0.0),
    zoom=lambda value, scale: (value / scale).astype(np.float32),
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
