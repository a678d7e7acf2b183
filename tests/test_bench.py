"""`mtlora-export bench` on a tiny build: the JSON it writes, FLOPs counted from ONNX shapes, percentiles.

No timing assertions: the numbers depend on the machine and its load.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from export.bench.timing import interleaved_latency, latency_stats, time_runs
from export.bench.worker import run_worker_spec
from export.cli import main as export_cli
from export.onnx.flops import count_flops
from export.pipeline.build import run_build
from export.pipeline.options import BuildOptions

pytest.importorskip("onnxruntime")

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream-mtlora-tiny" / "checkpoint.pth"
TASKS = ("semseg", "human_parts", "sal", "normals")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_build")
    outcome = run_build(BuildOptions(checkpoint=str(FIXTURE), backends=("onnxruntime",), precisions=("fp32",),
                                     eval_samples=2, report_samples=0, out=str(out)), lambda _line: None)
    assert outcome.passed
    return out


def test_bench_json_has_every_column(tiny_build, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(export_cli, ["bench", str(tiny_build), "--batch-sizes", "1,2", "--runs", "3",
                                             "--warmup", "1", "--budget", "0", "--no-torch", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime-fp32" in result.output and "p50 ms" in result.output
    bench = json.loads(out.read_text())
    assert bench["format"] == "mtlora-export/bench/1"
    assert bench["command"].startswith("mtlora-export")
    machine = bench["machine"]
    assert machine["threads"] >= 1 and machine["matmul"]["reference_gflops"] > 0
    # The tiny model's FLOPs, counted once from its fp32 graph, are what every row's rate is based on.
    flops = count_flops(tiny_build / "export" / "model.onnx")
    assert flops["flops"] > 0 and not flops["uncounted"]
    assert bench["model"]["flops_per_image"] == flops["flops"]
    rows = bench["rows"]
    assert [(r["name"], r["batch_size"]) for r in rows] == [
        ("onnxruntime-fp32", 1), ("onnxruntime-fp32", 2),
        ("onnxruntime-fp32 [semseg only]", 1), ("onnxruntime-fp32 [video end to end]", 1)]
    runtime, rows = rows[2:], rows[:2]
    # What the application sees, beside the infer rows: one task at run time, a generated video end to end.
    one_task, video = runtime
    assert one_task["kind"] == "engine" and "single layout" in one_task["notes"][0] and one_task["images_per_s"] > 0
    assert video["kind"] == "video" and video["images_per_s"] > 0 and video["runs"] == 48
    assert set(video["stage_ms_per_frame"]) == {"decode", "preprocess", "infer", "postprocess", "encode"}
    assert video["stage_ms_per_frame"]["infer"] > 0 and video["stage_ms_per_frame"]["decode"] > 0
    for row in rows:
        assert row["status"] == "built, passed"
        assert row["precision_requested"] == row["precision_executed"] == "fp32"
        assert row["size_mib"] > 0 and row["peak_rss_mib"] > 0
        # Runs that other processes disturbed are dropped and retried; rows say how many
        # (test_contended_runs_are_retried_and_counted checks that logic with a scripted timer).
        assert row["runs"] >= 3 and row["runs_discarded"] >= 0 and row["cpu_busy"] > 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["images_per_s"] > 0
        assert row["achieved_gflops"] == pytest.approx(flops["flops"] * row["images_per_s"] / 1e9)
        assert row["fraction_of_matmul"] == pytest.approx(row["achieved_gflops"] / machine["matmul"]["reference_gflops"])
        assert set(row["accuracy"]) == set(TASKS)
        assert all(task["passed"] for task in row["accuracy"].values())
        assert row["accuracy"]["semseg"]["agreement"] == 1.0


def test_build_options_are_refused_for_a_build_directory(tiny_build):
    result = CliRunner().invoke(export_cli, ["bench", str(tiny_build), "--backend", "openvino"])
    assert result.exit_code == 2 and "--backend applies only when building" in result.output


def test_torch_eager_worker_runs_unmerged_and_merged():
    for merged in (False, True):
        spec = {"kind": "torch", "load": {"checkpoint": str(FIXTURE), "img_size": None, "merged": merged},
                "threads": 1, "input_size": 64, "batch_sizes": [1], "warmup": 0, "runs": 3, "budget_s": 0}
        result = run_worker_spec(spec)
        stats = result["batches"]["1"]
        assert result["precision_executed"] == "fp32" and stats["runs"] == 3
        assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]


def test_flops_of_a_hand_made_graph(tmp_path):
    # x (batch, 3, 8, 8) -> Conv 4x3x3x3, pad 1 -> (batch, 4, 8, 8); m (batch, 5, 6) @ W (6, 7).
    conv_w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "conv_w")
    mm_w = numpy_helper.from_array(np.ones((6, 7), np.float32), "mm_w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv_w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("MatMul", ["m", "mm_w"], ["z"], name="matmul")],
        "hand_made",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [conv_w, mm_w],
    )
    path = tmp_path / "hand_made.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    conv_macs = 4 * 8 * 8 * (3 * 3 * 3)  # every output element: a 3x3x3 dot product
    matmul_macs = 5 * 6 * 7
    counted = count_flops(path)
    assert counted["by_op"] == {"MatMul": 2 * matmul_macs, "Gemm": 0, "Conv": 2 * conv_macs}
    assert counted["flops"] == 2 * (conv_macs + matmul_macs) == 14244
    assert counted["by_node"] == {"conv": 2 * conv_macs, "matmul": 2 * matmul_macs}
    assert count_flops(path, batch=3)["flops"] == 3 * 14244


def test_percentiles_are_ordered_and_runs_respect_the_limits():
    rng = np.random.default_rng(0)
    stats = latency_stats(rng.exponential(0.01, size=37), batch=8)
    assert stats["runs"] == 37
    assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    calls = []
    timings = time_runs(lambda: calls.append(1), warmup=2, runs=5, budget_s=0, timer=_scripted(set()))
    assert len(timings) == 3 and len(calls) == 2 + 3  # the minimum once the budget is spent
    timings = time_runs(lambda: None, warmup=0, runs=7, budget_s=60, timer=_scripted(set()))
    assert len(timings) == 7  # the cap on kept runs
    real = time_runs(lambda: None, warmup=0, runs=3, budget_s=0)  # the real timer, on this machine
    assert len(real) >= 3 and all(t.seconds >= 0 and t.own_cpu_s >= 0 for t in real)


def _scripted(contended_calls: set[int]):
    """A timer that says calls number `contended_calls` (0-based) were disturbed by other processes."""
    from export.bench.timing import Timing

    count = [0]

    def timer(infer, spare_cpus=0.0):
        infer()
        index = count[0]
        count[0] += 1
        return Timing(0.001, 0.001, 0.5 if index in contended_calls else 0.0, index in contended_calls)

    return timer


def test_contended_runs_are_retried_and_counted():
    timings = time_runs(lambda: None, warmup=0, runs=3, budget_s=60, timer=_scripted({1, 2}))
    assert [t.contended for t in timings] == [False, True, True, False, False]  # retried until 3 quiet ones
    # Never quiet: after twice the budget the contended runs are what there is.
    timings = time_runs(lambda: None, warmup=0, runs=3, budget_s=0, timer=_scripted(set(range(100))))
    assert len(timings) == 3 and all(t.contended for t in timings)


def test_interleaved_timing_keeps_whole_rounds():
    calls = []
    # The second round (calls 2 and 3 of the timer) is disturbed: it is dropped and one more is run.
    timed = interleaved_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3,
                                warmup=1, pause_s=0, timer=_scripted({3}))
    assert set(timed["seconds"]) == {"a", "b"}
    assert len(timed["seconds"]["a"]) == len(timed["seconds"]["b"]) == timed["rounds_kept"] == 3
    assert timed["rounds_dropped"] == 1 and not timed["contended"]
    assert calls[:2] == ["a", "b"] and calls[2:4] == ["a", "b"]  # warm-up, then the first round in order
    assert calls[4:6] == ["b", "a"]  # the order rotates


def test_one_task_at_run_time_on_a_split_build(ort_split_build):
    """The bench's one-task row on a split build runs the backbone and that task's head only."""
    from export.bench.targets import runtime_targets

    every, one_task = runtime_targets(ort_split_build, all_tasks=True, video=False)
    assert every.name == "onnxruntime-fp32 split [all tasks]" and "tasks" not in every.load
    assert one_task.name == "onnxruntime-fp32 split [semseg only]" and "other heads do not" in one_task.notes[0]
    spec = {"kind": one_task.kind, "load": one_task.load, "threads": 1, "input_size": 64, "batch_sizes": [1],
            "warmup": 1, "runs": 3, "budget_s": 0}
    result = run_worker_spec(spec)
    assert result["batches"]["1"]["runs"] >= 3 and result["batches"]["1"]["images_per_s"] > 0
