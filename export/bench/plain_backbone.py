"""The plain backbone: the hand-tuned anchor the multi-task graph is measured against.

The timm Swin-T 448 backbone alone (`forward_features`: no adapters, no task streams, no decoders),
exported through the same fixed-resolution blocks as the engines' graphs and built into the same
engine and precision as each of the benchmark's engines, with the same graph preparation and
calibration. Timed in turn with the four-task engine of the same engine and precision, it says how
much of the backbone's FLOP rate (model FLOPs x images/s) the multi-task graph keeps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.artifacts.files import write_json_atomic
from export.onnx.flops import count_flops
from export.onnx.fold import ExportBackbone, swap_linears
from mtlora.loading import load_any
from mtlora.merge import unload


class BackboneAlone(nn.Module):
    """image (B, 3, H, W) -> timm's `forward_features` output (B, H/32, W/32, C), in export form."""

    def __init__(self, swin: nn.Module):
        super().__init__()
        swap_linears(swin)
        self.backbone = ExportBackbone(swin)
        self.norm = swin.norm

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.backbone.embed(image)
        for stage in self.backbone.stages:
            for block in stage.blocks:
                x = block(x)
            if stage.merging is not None:
                x = stage.merging(x)
        return self.norm(x)


def export_backbone(swin: nn.Module, out: Path, image: np.ndarray) -> float:
    """Write the ONNX of timm `swin`'s `forward_features` to `out` (the module's linears are taken over);
    returns the max abs difference between ONNX Runtime's output and timm's own forward."""
    x = torch.from_numpy(image)
    with torch.inference_mode():
        expected = swin.forward_features(x).numpy()
    export = BackboneAlone(swin).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(export, (x,), str(out), input_names=["image"], output_names=["features"],
                          opset_version=17, dynamo=False, dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
    return float(np.abs(got - expected).max())


def build_backbones(checkpoint: Path, work: Path, keys: list[str], img_size: int, calib_samples: int,
                    threads: int | None, say: Callable[[str], None]) -> dict[str, Any]:
    """The backbone of `checkpoint` (a timm Swin, with the model's frozen full-rank weights and no adapter)
    built into every `backend-precision` of `keys`; returns {"engines": {key: engine path}, "flops",
    "max_abs_vs_timm", "executed": {key: precision that ran}}."""
    from calibration.prepare import prepare_graph
    from engines.registry import get_backend

    image = np.random.default_rng(1).standard_normal((1, 3, img_size, img_size), dtype=np.float32)
    onnx_path = work / "backbone.onnx"
    # The export's agreement with timm, kept beside it: a later run that reuses the ONNX reports it too.
    agreement = work / "backbone.max_abs.json"
    if not onnx_path.is_file() or not agreement.is_file():
        swin = load_any(checkpoint, img_size).float().eval().backbone
        # The backbone alone: every adapter layer's frozen base weight, as a plain Linear.
        unload(swin)
        write_json_atomic(agreement, {"max_abs_vs_timm": export_backbone(swin, onnx_path, image)})
    max_abs = json.loads(agreement.read_text())["max_abs_vs_timm"]
    rng = np.random.default_rng(2)
    calibration = [{"image": rng.standard_normal(image.shape, dtype=np.float32)} for _ in range(calib_samples)]
    engines, executed = {}, {}
    for key in keys:
        backend, _, precision = key.partition("-")
        out = work / key
        existing = sorted(out.glob("backbone.*.json")) if out.is_dir() else []
        if existing:
            from engines.artifact import EngineArtifact

            artifact = EngineArtifact.load(existing[0].with_suffix(""), backend=backend)
        else:
            say(f"[bench-docs] plain backbone: {key}")
            prepared = prepare_graph(backend, onnx_path, work / "graphs" / key, precision,
                                     calibration=calibration if precision == "int8" else None, cache=work / "cache")
            artifact = get_backend(backend).build(prepared.path, out, precision=precision, name="backbone",
                                                  metadata=prepared.metadata, threads=threads)
        engines[key], executed[key] = artifact.path, artifact.precision_executed
    return {"engines": engines, "flops": count_flops(onnx_path)["flops"], "max_abs_vs_timm": max_abs,
            "executed": executed, "img_size": img_size}

