"""Render task maps as RGB images in the usual palettes (numpy + PIL, no torch).

Segmentation uses the PASCAL VOC class palette, normals map xyz in [-1, 1] to
RGB, saliency and edges are grey levels of their probability, depth and error
maps use a perceptual heat ramp.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from mtlora.tasks import CLASS_IDS, CLASS_MAP, KINDS, NORMALS, kind_of

HEAT_STOPS = np.array(
    [[0.05, 0.03, 0.2], [0.35, 0.1, 0.55], [0.75, 0.2, 0.45], [0.98, 0.55, 0.2], [0.99, 0.95, 0.6]]
)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: class i's bits spread over the RGB channels."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


_PALETTE = voc_palette()


def heat(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Map values >= 0 to RGB uint8 along the heat ramp, 0 -> dark, vmax -> bright."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0)
    top = float(vmax if vmax is not None else max(values.max(initial=0.0), 1e-12))
    t = np.clip(values / top, 0.0, 1.0) * (len(HEAT_STOPS) - 1)
    low = np.floor(t).astype(int)
    high = np.minimum(low + 1, len(HEAT_STOPS) - 1)
    frac = (t - low)[..., None]
    return (255 * (HEAT_STOPS[low] * (1 - frac) + HEAT_STOPS[high] * frac)).astype(np.uint8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))


def unit_normals(normals: np.ndarray) -> np.ndarray:
    """(3, H, W) -> unit vectors (H, W, 3); zero vectors stay zero."""
    v = np.moveaxis(normals.astype(np.float64), 0, -1)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def render_output(task: str, output: np.ndarray, kind: str | None = None) -> np.ndarray:
    """A model output (C, H, W), or a post-processed one of `kind` ((H, W) class ids, probabilities), as RGB."""
    palette = KINDS[kind or kind_of(task)].palette
    if palette == "voc":
        return _PALETTE[output.argmax(0) % 256]
    if palette == "voc_ids":
        return _PALETTE[np.asarray(output).astype(np.int64) % 256]
    if palette == "grey_probability":
        grey = (255 * np.clip(output[0], 0, 1)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if palette == "normals":
        return (255 * (unit_normals(output) + 1) / 2).clip(0, 255).astype(np.uint8)
    if palette == "grey":
        grey = (255 * _sigmoid(output[0])).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return heat(output[0])


def render_label(task: str, label: np.ndarray) -> np.ndarray:
    """A label map as RGB; ignored pixels (255, zero normals) are drawn white."""
    palette = KINDS[kind_of(task)].palette
    if palette == "voc":
        label = np.asarray(label).astype(np.int64)
        rgb = _PALETTE[np.clip(label, 0, 255)]
        rgb[label == 255] = 255
        return rgb
    if palette == "normals":
        label = np.asarray(label)
        hwc = label if label.shape[-1] == 3 else np.moveaxis(label, 0, -1)
        rgb = (255 * (hwc + 1) / 2).clip(0, 255).astype(np.uint8)
        rgb[np.linalg.norm(hwc, axis=-1) == 0] = 255
        return rgb
    plane = np.asarray(label, dtype=np.float64).reshape(np.asarray(label).shape[-2:])
    if palette == "grey":
        grey = (255 * np.clip(plane, 0, 1)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return heat(plane)


def error_map(task: str, engine: np.ndarray, reference: np.ndarray, kind: str | None = None) -> tuple[np.ndarray, str]:
    """Where the engine differs from the reference (both of `kind`, default the task's), and what the colours mean."""
    kind = kind or kind_of(task)
    if kind in (CLASS_MAP, CLASS_IDS):
        disagree = (engine.argmax(0) != reference.argmax(0)) if kind == CLASS_MAP else (engine != reference)
        rgb = np.full(disagree.shape + (3,), 20, np.uint8)
        rgb[disagree] = (255, 60, 60)
        return rgb, f"class disagreement ({100 * disagree.mean():.2f}% of pixels)"
    if kind == NORMALS:
        e, r = unit_normals(engine), unit_normals(reference)
        angle = np.degrees(2 * np.arctan2(np.linalg.norm(e - r, axis=-1), np.linalg.norm(e + r, axis=-1)))
        return heat(angle, vmax=10.0), f"angular error, 0-10 deg (mean {angle.mean():.3f} deg)"
    diff = np.abs(engine - reference).max(axis=0)
    scale = max(float(np.abs(reference).max()), 1e-6) * 0.1
    return heat(diff, vmax=scale), f"absolute difference, 0-{scale:.3g} (max {diff.max():.3g})"


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
    """A normalised (3, H, W) input back to RGB uint8 (H, W, 3)."""
    rgb = np.moveaxis(image, 0, -1) * np.asarray(std) + np.asarray(mean)
    return (255 * rgb).clip(0, 255).astype(np.uint8)


def png_data_uri(rgb: np.ndarray, scale: int = 1) -> str:
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
