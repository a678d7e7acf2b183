"""Image and .npz loading and THE inference preprocessing (numpy + Pillow, no torch).

Every path that turns a picture into model input goes through `preprocess`:
the engines on a device, the PyTorch reference outputs, and the validation
transform used in training. Keeping one implementation is what makes their
numbers identical, so do not re-implement it with torchvision or OpenCV,
whose bilinear filters differ from Pillow's.

The data set transforms (`mtlora.data.transforms`) first resize a sample's
8-bit image the way the official MTLoRA evaluation does (OpenCV bicubic, which
needs the training extra) and then call `preprocess` at that size, where it
only normalises; an arbitrary picture is resized here, with Pillow.
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtlora.errors import ConfigError, DataError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# About 8k x 8k. Far above any camera frame we expect, far below what a crafted
# "decompression bomb" header would make us allocate.
MAX_IMAGE_PIXELS = 64_000_000

# What reading a damaged or hostile .npz can raise: numpy, zipfile and zlib each have their own.
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """An .npz archive opened without pickle: a pickled file or object array is refused, never unpickled.

    Another numpy file raises ValueError; a damaged one raises one of NPZ_READ_ERRORS, here or
    when an array is read.
    """
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    return data


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    apply_exif_orientation: bool = True,
) -> np.ndarray:
    """Read an image file as 8-bit RGB, `(H, W, 3)` uint8.

    Conversions: grayscale and 1-bit images are replicated to three channels;
    16-bit images keep their top 8 bits of range (value / 257); 32-bit integer
    images are taken to hold 16-bit data (what Pillow gives for 16-bit PNGs);
    CMYK and YCbCr go through Pillow's converters; images with transparency
    (RGBA, LA, palette with a transparent index) are composited over black, so
    the colour hidden under fully transparent pixels never leaks into the model.

    `apply_exif_orientation` rotates phone photos upright. Data set loaders turn
    it off, because label maps are aligned with the stored pixel grid.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}; check the path and the data set root")
    if os.path.getsize(path) == 0:
        raise DataError(f"image file is empty (0 bytes): {path}; re-copy or re-download it")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; we want a hard stop.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height == 0:
                    raise DataError(f"image has zero size ({width}x{height}): {path}; replace the file")
                if width * height > max_pixels:
                    raise DataError(
                        f"image is {width}x{height} = {width * height} pixels, above the limit of "
                        f"{max_pixels}: {path}; downscale it first (this guards against decompression bombs)"
                    )
                img.load()
                if apply_exif_orientation:
                    img = ImageOps.exif_transpose(img)
                return _to_rgb8(img, path)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image is too large to decode safely: {path}; downscale it first ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"file is not an image Pillow can read: {path}; check its format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image file is corrupt or truncated: {path}; re-copy it ({exc})") from exc


def _to_rgb8(img: Image.Image, path: str) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)
        gray = np.clip(values, 0, 65535) / 257.0
        return _gray_to_rgb(np.rint(gray).astype(np.uint8))
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        # Float images come either normalised to [0, 1] or in 8-bit units.
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(values * scale), 0, 255)
        return _gray_to_rgb(np.rint(gray).astype(np.uint8))
    if mode in ("1", "L"):
        return _gray_to_rgb(np.asarray(img.convert("L"), dtype=np.uint8))
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
        mode = img.mode
    if mode == "RGBA":
        rgba = np.asarray(img, dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        return np.rint(rgba[..., :3] * alpha).astype(np.uint8)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as exc:
        raise DataError(f"image mode {mode!r} cannot be converted to RGB: {path}; save it as RGB") from exc


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ConfigError(f"size must be two positive integers (height, width), got {tuple(size)!r}")
    return int(size[0]), int(size[1])


def preprocess(
    image: np.ndarray,
    size: Sequence[int] = (448, 448),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Turn an RGB uint8 image `(H, W, 3)` into model input `(3, h, w)` float32.

    Resizes to `size = (h, w)` without keeping the aspect ratio (as the paper's
    448x448 training does) with Pillow's bilinear filter, which widens its
    support when shrinking (antialiasing), then scales to [0, 1] and applies
    per-channel `(x - mean) / std`.
    """
    height, width = _check_size(size)
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"mean and std need 3 values each and std must be positive, got {mean!r}, {std!r}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise DataError(
            f"preprocess needs an RGB uint8 array of shape (H, W, 3), got {dtype} {shape}; use load_image"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(f"image has zero size {image.shape[:2]}; nothing to preprocess")
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    pixels = image.astype(np.float32) / np.float32(255.0)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocess_batch(
    images: Sequence[np.ndarray],
    size: Sequence[int] = (448, 448),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """`preprocess` each image and stack them into `(N, 3, h, w)` float32."""
    if len(images) == 0:
        raise ConfigError("preprocess_batch needs at least one image, got an empty list")
    return np.stack([preprocess(image, size, mean, std) for image in images])
