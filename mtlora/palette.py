"""How output maps are drawn and compared by eye: the colour maps a task kind's row uses (numpy only).

Class maps use the PASCAL VOC class palette, normals map xyz in [-1, 1] to RGB,
binary maps are grey levels of their probability, depth and error maps use a
perceptual heat ramp. Every function returns (H, W, 3) uint8.
"""

from __future__ import annotations

import numpy as np

HEAT_STOPS = np.array(
    [[0.05, 0.03, 0.2], [0.35, 0.1, 0.55], [0.75, 0.2, 0.45], [0.98, 0.55, 0.2], [0.99, 0.95, 0.6]]
)
IGNORE_INDEX = 255


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


VOC = voc_palette()


def heat(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Map values >= 0 to RGB uint8 along the heat ramp, 0 -> dark, vmax -> bright."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0)
    top = float(vmax if vmax is not None else max(values.max(initial=0.0), 1e-12))
    t = np.clip(values / top, 0.0, 1.0) * (len(HEAT_STOPS) - 1)
    low = np.floor(t).astype(int)
    high = np.minimum(low + 1, len(HEAT_STOPS) - 1)
    frac = (t - low)[..., None]
    return (255 * (HEAT_STOPS[low] * (1 - frac) + HEAT_STOPS[high] * frac)).astype(np.uint8)


def grey(probability: np.ndarray) -> np.ndarray:
    """A probability map (H, W) in [0, 1] as grey levels."""
    level = (255 * np.clip(probability, 0, 1)).astype(np.uint8)
    return np.repeat(level[..., None], 3, axis=-1)


def class_colours(ids: np.ndarray) -> np.ndarray:
    """Class ids (H, W) in the VOC palette, taken modulo 256."""
    # `take` with wrapped indices is the modulo without a cast and a pass of its own: five times
    # faster than fancy indexing, which counts on a video overlay drawing every frame.
    return np.take(VOC, np.asarray(ids), axis=0, mode="wrap")


def class_label_colours(label: np.ndarray) -> np.ndarray:
    """A class label map (H, W) in the VOC palette, ignored pixels (255) white."""
    label = np.asarray(label).astype(np.int64)
    rgb = VOC[np.clip(label, 0, 255)]
    rgb[label == IGNORE_INDEX] = 255
    return rgb


def normals_colours(unit_hwc: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3), xyz in [-1, 1], as RGB."""
    return (255 * (unit_hwc + 1) / 2).clip(0, 255).astype(np.uint8)


def plane(label: np.ndarray) -> np.ndarray:
    """A one-channel label (H, W) or (1, H, W) as a float (H, W) plane."""
    return np.asarray(label, dtype=np.float64).reshape(np.asarray(label).shape[-2:])


def disagreement(disagree: np.ndarray) -> tuple[np.ndarray, str]:
    """Pixels where two class maps differ, in red on black, and the share of them."""
    rgb = np.full(disagree.shape + (3,), 20, np.uint8)
    rgb[disagree] = (255, 60, 60)
    return rgb, f"class disagreement ({100 * disagree.mean():.2f}% of pixels)"


def absolute_difference(engine: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str]:
    """The largest absolute difference over channels, on a scale of a tenth of the reference's range."""
    diff = np.abs(engine - reference).max(axis=0)
    scale = max(float(np.abs(reference).max()), 1e-6) * 0.1
    return heat(diff, vmax=scale), f"absolute difference, 0-{scale:.3g} (max {diff.max():.3g})"
