"""The targets' reference setup (the backbone alone), on a tiny Swin: real export, OpenVINO and NNCF."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.bench_reference import ISSUE_MS, bench_backbone, reference_lines
from mtlora.checkpoint import save_checkpoint
from mtlora.config import AdapterConfig, ModelConfig, SwinConfig
from mtlora.model import MultiTaskSwin


def test_backbone_alone_matches_timm_and_is_timed_in_turn(tmp_path: Path):
    config = ModelConfig(swin=SwinConfig.from_variant("swin_micro", img_size=64), adapter=AdapterConfig(kind="full"),
                         tasks=("semseg", "sal"))
    checkpoint = save_checkpoint(MultiTaskSwin(config).eval(), tmp_path / "ckpt")
    lines: list[str] = []
    result = bench_backbone(checkpoint, tmp_path / "work", threads=1, rounds=2, calib_samples=8, say=lines.append)

    assert result["max_abs_vs_timm"] < 1e-4
    assert result["img_size"] == 64
    assert result["executed"] == {"fp32": "fp32", "int8": "int8"}
    seconds = result["interleaved"]["seconds"]
    assert set(seconds) == set(ISSUE_MS)
    assert all(len(s) == result["interleaved"]["rounds_kept"] >= 2 and min(s) > 0 for s in seconds.values())
    assert (tmp_path / "work" / "openvino-int8").is_dir()

    page = "\n".join(reference_lines(result, sgemm_gflops=100.0))
    ms = {name: np.median(s) * 1e3 for name, s in seconds.items()}
    assert f"| openvino-int8 | 43 | {ms['openvino-int8']:.0f} |" in page
    assert f"{ms['pytorch-eager'] / ms['openvino-int8']:.2f}x faster than PyTorch eager" in page
