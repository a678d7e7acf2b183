"""Shared fixtures for the engine and calibration tests: a tiny multi-task ONNX and its reference.

The network has the ops that matter for precision handling in a Swin MTL model, at toy size:
Conv patch stem -> LayerNorm -> attention (MatMul, Softmax) -> residual -> LayerNorm -> GELU MLP ->
residual -> per-task 1x1 Conv heads + bilinear Resize, outputs 'semseg' (5 ch) and 'sal' (1 ch).
Input 'image' is (N, 3, 32, 32) with a dynamic batch, exported at opset 17.

Test modules load it with ``pytest_plugins`` and also import its helpers, so pytest meets it already
imported; it holds no asserts to rewrite: PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

try:
    import torch
    from torch import nn

    _Module = nn.Module
except ImportError:  # the fixture skips; engines themselves never need torch
    torch = nn = None
    _Module = object

TASKS = (("semseg", 5), ("sal", 1))
IMAGE_SHAPE = (3, 32, 32)
CALIBRATION_SAMPLES = 16


class TinyMultiTaskNet(_Module):
    def __init__(self, dim: int = 16, patch: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.heads = nn.ModuleList([nn.Conv2d(dim, channels, 1) for _, channels in TASKS])
        self.patch = patch
        self.scale = dim**-0.5

    def forward(self, image):  # image: (B, 3, H, W)
        x = self.stem(image)  # (B, C, H/p, W/p)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(self.norm1(tokens)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)
        tokens = tokens + self.proj(attention @ v)
        tokens = tokens + self.fc2(self.act(self.fc1(self.norm2(tokens))))
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        return tuple(
            nn.functional.interpolate(head(x), scale_factor=float(self.patch), mode="bilinear", align_corners=False)
            for head in self.heads
        )


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Image-like float32 batches (low-frequency structure plus noise), not white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
    images = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    return (images + 0.3 * rng.standard_normal((n, *IMAGE_SHAPE))).astype(np.float32)


def relative_error(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """max |out - ref| / max |ref|, per output."""
    return {k: float(np.abs(out[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref}


def max_abs_error(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.abs(out[k] - ref[k]).max()) for k in ref}


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    if torch is None:
        pytest.skip("torch is needed to export the tiny test ONNX")
    torch.manual_seed(0)
    model = TinyMultiTaskNet().eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny_mtl.onnx"
    dynamic = {name: {0: "batch"} for name in ["image", *(t for t, _ in TASKS)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            model,
            (torch.randn(2, *IMAGE_SHAPE),),
            str(path),
            input_names=["image"],
            output_names=[t for t, _ in TASKS],
            opset_version=17,
            dynamic_axes=dynamic,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="session")
def test_batch() -> np.ndarray:
    return smooth_images(3, seed=1)


@pytest.fixture(scope="session")
def reference(tiny_onnx, test_batch) -> dict[str, np.ndarray]:
    """ONNX Runtime fp32 outputs of the tiny ONNX on the test batch: what every engine is compared with."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": test_batch}), strict=True))


@pytest.fixture(scope="session")
def calibration_set():
    from calibration.data import CalibrationSet

    return CalibrationSet.from_arrays(smooth_images(CALIBRATION_SAMPLES, seed=2))


@pytest.fixture(scope="session")
def qdq_onnx(tiny_onnx, calibration_set, tmp_path_factory) -> Path:
    """The Q/DQ int8 ONNX (default settings), built once per session."""
    from calibration.qdq import quantize_qdq

    return quantize_qdq(tiny_onnx, tmp_path_factory.mktemp("qdq") / "tiny.qdq.onnx", calibration_set)
