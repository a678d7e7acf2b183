"""The benchmark's anchors on a tiny Swin: the plain backbone built into real engines, and the rule that
decides when the benchmark model is trained enough.

The backbone builds run in their own interpreter, as `make bench` runs them: OpenVINO runners and NNCF
state stay alive there, which the rest of the test session must not inherit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from export.bench.model import CLEAR_MARGIN, clearly_trained, training_summary
from mtlora.checkpoint import save_checkpoint
from mtlora.config import AdapterConfig, ModelConfig, SwinConfig
from mtlora.model import MultiTaskSwin


def test_plain_backbone_matches_timm_in_every_engine(tmp_path: Path):
    config = ModelConfig(swin=SwinConfig.from_variant("swin_micro", img_size=64),
                         adapter=AdapterConfig(kind="mtlora", shared_rank=4, task_rank={"semseg": 2, "sal": 2}),
                         tasks=("semseg", "sal"))
    checkpoint = save_checkpoint(MultiTaskSwin(config).eval(), tmp_path / "ckpt")
    out = tmp_path / "result.json"
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from export.bench.plain_backbone import build_backbones
        result = build_backbones(Path({str(checkpoint)!r}), Path({str(tmp_path / "work")!r}),
                                 ["onnxruntime-fp32", "onnxruntime-int8", "openvino-fp16"], 64, 8, 1, print)
        result["engines"] = {{k: str(v) for k, v in result["engines"].items()}}
        Path({str(out)!r}).write_text(json.dumps(result))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["max_abs_vs_timm"] < 1e-4 and result["img_size"] == 64 and result["flops"] > 0
    assert set(result["engines"]) == {"onnxruntime-fp32", "onnxruntime-int8", "openvino-fp16"}
    assert all(Path(p).is_file() for p in result["engines"].values())
    assert result["executed"]["onnxruntime-fp32"] == "fp32" and result["executed"]["onnxruntime-int8"] == "int8"
    # The backbone alone carries no adapter: its graph has no low-rank factor.
    import onnx

    names = {i.name for i in onnx.load(str(tmp_path / "work" / "backbone.onnx")).graph.initializer}
    assert names and not any("lora" in n for n in names)


def _log(tmp_path: Path, untrained: dict, trained: dict) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    records = [{"epoch": epoch, **{f"val/{t}/{CLEAR_MARGIN[t][0]}": v for t, v in values.items()}}
               for epoch, values in ((0, untrained), (4, trained))]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return run


def test_the_benchmark_model_is_trained_until_every_task_clearly_beats_an_untrained_copy(tmp_path):
    untrained = {"semseg": 5.0, "human_parts": 20.0, "sal": 15.0, "normals": 70.0}
    good = {"semseg": 40.0, "human_parts": 45.0, "sal": 50.0, "normals": 30.0}
    assert clearly_trained(training_summary(_log(tmp_path, untrained, good)))
    # One task that barely moved (normals 3 degrees better) keeps it training.
    assert not clearly_trained(training_summary(_log(tmp_path, untrained, {**good, "normals": 67.0})))
    assert not clearly_trained({})
