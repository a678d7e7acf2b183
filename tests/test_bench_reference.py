"""The targets' reference setup (the backbone alone), on a tiny Swin: real export, OpenVINO and NNCF.

The benchmark runs in its own interpreter, as `make bench` runs it: it sets torch's thread count and
keeps OpenVINO runners and NNCF state alive, which the rest of the test session must not inherit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from export.bench.plain_backbone import ISSUE_MS, reference_lines
from mtlora.checkpoint import save_checkpoint
from mtlora.config import AdapterConfig, ModelConfig, SwinConfig
from mtlora.model import MultiTaskSwin


def test_backbone_alone_matches_timm_and_is_timed_in_turn(tmp_path: Path):
    config = ModelConfig(swin=SwinConfig.from_variant("swin_micro", img_size=64), adapter=AdapterConfig(kind="full"),
                         tasks=("semseg", "sal"))
    checkpoint = save_checkpoint(MultiTaskSwin(config).eval(), tmp_path / "ckpt")
    out = tmp_path / "result.json"
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from export.bench.plain_backbone import bench_backbone
        result = bench_backbone(Path({str(checkpoint)!r}), Path({str(tmp_path / "work")!r}), threads=1, rounds=2,
                                calib_samples=8, say=print)
        Path({str(out)!r}).write_text(json.dumps(result))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())

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
