"""Task maps as RGB images, each drawn as its kind's row says (`mtlora.tasks`, palettes in
`mtlora.palette`), and as PNG data URIs for the HTML report (numpy + PIL, no torch)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from mtlora.tasks import KINDS, kind_of


def render_output(task: str, output: np.ndarray, kind: str | None = None) -> np.ndarray:
    """A model output (C, H, W), or a post-processed one of `kind` ((H, W) class ids, probabilities), as RGB."""
    return KINDS[kind or kind_of(task)].render(output)


def render_label(task: str, label: np.ndarray) -> np.ndarray:
    """A label map as RGB; ignored pixels (255, zero normals) are drawn white."""
    return KINDS[kind_of(task)].render_label(label)


def error_map(task: str, engine: np.ndarray, reference: np.ndarray, kind: str | None = None) -> tuple[np.ndarray, str]:
    """Where the engine differs from the reference (both of `kind`, default the task's), and what the colours mean."""
    return KINDS[kind or kind_of(task)].difference(engine, reference)


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
