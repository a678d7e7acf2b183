"""`python -m export.bench.application`: ratio 1 (video end to end over `infer` alone) with its stages'
CPU time and the ceiling they set, on a real engine and a generated clip. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from export.bench.application import main
from export.video.pipeline import STAGES

pytest.importorskip("cv2")


def test_ratio_comes_with_each_stages_cpu_time_and_the_ceiling_it_sets(ort_build, tmp_path, capsys):
    out = tmp_path / "app.json"
    engine = ort_build / "engines" / "onnxruntime-fp32"
    assert main(["--video-engine", str(engine), "--frames", "6", "--rounds", "1", "--threads", "1",
                 "--frame-size", "96", "80", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert "one_vs_all" not in result  # no split engine given: ratio 1 alone
    video = result["video_vs_infer"]
    assert video["frames"] == 6 and video["frame_size"] == [96, 80] and video["threads"] == 1
    assert video["ratio"] == pytest.approx(video["video_frames_per_s"] / video["infer_images_per_s"])
    cpu = video["stage_cpu_ms_per_frame"]
    assert set(cpu) == set(video["stage_ms_per_frame"]) == set(STAGES)
    assert cpu["decode"] > 0 and cpu["preprocess"] > 0 and cpu["encode"] > 0
    assert video["other_cpu_ms"] == pytest.approx(sum(v for stage, v in cpu.items() if stage != "infer"))
    assert video["infer_cpu_ms"] > 0 and video["infer_ms"] == pytest.approx(1000 / video["infer_images_per_s"])
    # The ceiling is what the module docstring derives, from the numbers beside it.
    expected = min(1.0, video["cores"] * video["infer_ms"] / (video["infer_cpu_ms"] + video["other_cpu_ms"]))
    assert 0 < video["ceiling_on_this_machine"] == pytest.approx(expected)
