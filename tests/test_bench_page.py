"""The bench page's parts without the 30-60 minute run: the per-precision MatMul yardstick measured for real
(at a small size), the mixed-precision search read from report.json records, and the page written from
synthetic results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.bench.engine_matmul import SGEMM, MatmulRate, apply_yardsticks, yardstick
from export.bench.page import write_page
from export.bench.precision_ladder import build_rungs, judge_search, pure_angles, tight_tolerances
from export.bench.tables import perf_rows
from export.checking.results import (
    AutoSelection,
    Candidate,
    Check,
    EngineCheck,
    EngineInfo,
    Fallback,
    FallbackTask,
    MetricComparison,
    Report,
    TaskResult,
    TensorAgreement,
)
from export.checking.tolerances import Tolerances

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the MatMul yardstick, for real


MEASURE = """
import json, sys
from pathlib import Path
from export.bench.engine_matmul import measure_engine_matmul
from export.bench.options import BenchOptions
opts = BenchOptions(batch_sizes=(1,), threads=1, warmup=1, runs=3, budget_s=0)
rates = measure_engine_matmul(Path(sys.argv[1]), sys.argv[2].split(","), opts, size=256)
print(json.dumps([rate.to_dict() for rate in rates]))
"""


def _measured_in_a_child(work: Path, backends: list[str]) -> list[MatmulRate]:
    """`measure_engine_matmul` in its own interpreter, as the bench runs it. (It was moved there when a worker
    crashed here; the cause was OpenVINO's signal stack: engines/openvino/signal_stack.py.)"""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(work), ",".join(backends)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [MatmulRate.from_dict(row) for row in json.loads(done.stdout.strip().splitlines()[-1])]


def test_matmul_rate_per_backend_and_executed_precision(tmp_path):
    backends = ["onnxruntime"]
    try:
        import openvino  # noqa: F401

        backends.append("openvino")
    except ImportError:
        pass
    rates = _measured_in_a_child(tmp_path, backends)
    by = {(r.backend, r.precision_requested): r for r in rates}
    assert not [r for r in rates if r.error], [r.error for r in rates if r.error]
    assert all(r.size == 256 and r.gflops > 0 and r.p50_ms > 0 for r in rates)
    # ONNX Runtime's CPU provider has no fp16 MatMul kernel: its fp16 engine runs fp32, and says so.
    assert by["onnxruntime", "fp32"].precision_executed == "fp32"
    assert by["onnxruntime", "fp16"].precision_executed == "fp32"
    assert by["onnxruntime", "int8"].precision_executed == "int8"  # the Q/DQ pair fused into an int8 kernel
    if "openvino" in backends:
        assert by["openvino", "fp32"].precision_executed == "fp32"
        assert by["openvino", "int8"].precision_executed == "int8"
        assert by["openvino", "bf16"].precision_executed in ("bf16", "fp32")  # fp32 where the CPU has no bf16
    # An engine row is divided by its own backend and executed precision; the request that ran it exactly wins
    # (ORT fp16 ran fp32 too, but the fp32 request is the fp32 yardstick).
    assert yardstick(rates, "onnxruntime", "fp32") is by["onnxruntime", "fp32"]
    assert yardstick(rates, "onnxruntime", "int8") is by["onnxruntime", "int8"]
    assert yardstick(rates, "pytorch", "fp32") is None


def test_rows_are_divided_by_their_own_precisions_rate():
    rates = [MatmulRate("openvino", "bf16", "bf16", 2048, 600.0), MatmulRate("openvino", "fp32", "fp32", 2048, 150.0),
             MatmulRate("openvino", "fp16", "bf16", 2048, 580.0), MatmulRate("onnxruntime", "int8", "int8", 2048, 0.0),
             MatmulRate("onnxruntime", "fp16", "fp32", 2048, 120.0)]
    rows = [_row("openvino-fp16", "openvino", "fp16", "bf16", 300.0),  # ran bf16: the bf16 request's rate
            _row("openvino-fp32", "openvino", "fp32", "fp32", 120.0),
            _row("onnxruntime-fp16", "onnxruntime", "fp16", "fp32", 90.0),  # only the fp16 request ran fp32
            _row("onnxruntime-int8", "onnxruntime", "int8", "int8", 170.0),  # its rate failed: sgemm
            _row("pytorch-unmerged", "pytorch", "fp32", "fp32", 60.0)]
    result = {"machine": {"matmul": {"reference_gflops": 300.0}}, "rows": rows}
    apply_yardsticks(result, rates)
    fractions = {r["name"]: (r["fraction_of_matmul"], r["matmul_yardstick"]) for r in rows}
    assert fractions == {"openvino-fp16": (0.5, "openvino bf16"), "openvino-fp32": (0.8, "openvino fp32"),
                         "onnxruntime-fp16": (0.75, "onnxruntime fp16 (ran fp32)"),
                         "onnxruntime-int8": (pytest.approx(170 / 300), SGEMM),
                         "pytorch-unmerged": (0.2, SGEMM)}
    assert rows[0]["fraction_of_sgemm"] == 1.0  # the old figure stays in the JSON
    assert result["machine"]["engine_matmul"][0] == rates[0].to_dict()
    table = {r[0]: r for r in perf_rows(result)}
    assert table["openvino-fp16"][12:14] == ["50%", "openvino bf16, 600 GFLOP/s"]
    assert table["pytorch-unmerged"][12:14] == ["20%", f"{SGEMM}, 300 GFLOP/s"]


def _row(name, backend, requested, executed, gflops):
    return {"name": name, "kind": "engine", "backend": backend, "precision_requested": requested,
            "precision_executed": executed, "status": "built, passed", "size_mib": 1.0, "batch_size": 1,
            "achieved_gflops": gflops, "accuracy": {}}


# ----------------------------------------------------------------------------- reports, as builds write them

TASKS = ("semseg", "normals")
PURE_ANGLE = 0.767


def _check(backend, precision, angle, semseg_drop=0.01, limit=0.5, executed=None, normals_drop=0.02):
    tensor = TensorAgreement(0.1, 0.01, 0.9999)
    semseg = TaskResult("semseg", tensor, agreement=0.998,
                        metrics=MetricComparison("mIoU", True, {"mIoU": 80.0 - semseg_drop}, {"mIoU": 80.0}),
                        checks=(Check("argmax_agreement", 0.998, 0.97, ">="),))
    normals = TaskResult("normals", tensor, angle_deg=angle,
                         metrics=MetricComparison("mean", False, {"mean": 30.0 + normals_drop}, {"mean": 30.0}),
                         checks=(Check("angle_deg", angle, limit, "<="),))
    return EngineCheck(EngineInfo(backend, precision, executed or precision), 10, True, "pytorch",
                       {"semseg": semseg, "normals": normals})


def _fallback(verdict="fixed", after=0.2, latency=None, limit=PURE_ANGLE / 3):
    return Fallback("openvino-fp16", verdict, "every task passes with 3 layers in fp32",
                    (FallbackTask("normals", "angle_deg", limit, "<=", PURE_ANGLE, after),),
                    latency_ms=latency if latency is not None else {"fp16": 160.0, "fp16+fallback": 175.0,
                                                                    "fp32": 390.0})


def _main_report():
    """The bench's first build: every precision with the default tolerances (OpenVINO fp16 runs bf16)."""
    return Report({"tasks": list(TASKS)}, [_check("openvino", "fp32", 0.001, limit=0.5),
                                           _check("openvino", "fp16", PURE_ANGLE, executed="bf16"),
                                           _check("openvino", "bf16", 0.74, limit=1.5)],
                  fallbacks=[_fallback("stopped", after=None, latency={"fp16": 160.0, "fp32": 390.0})])


def test_the_tight_tolerance_file_is_a_third_of_the_pure_16bit_angle(tmp_path):
    angles = pure_angles("openvino", "fp16", [_main_report()])
    assert angles == {"normals": PURE_ANGLE}
    limits = tight_tolerances(angles)
    path = tmp_path / "tight.json"
    path.write_text(json.dumps(limits))
    tolerances = Tolerances.from_file(path)  # the build's own parser accepts it
    tolerances.check_tasks(TASKS)
    for precision in ("fp16", "bf16"):
        assert tolerances.for_task(precision, "normals").max_angle_deg == pytest.approx(PURE_ANGLE / 3)
        assert tolerances.for_task(precision, "semseg").min_argmax_agreement is not None  # the rest: defaults
    # A main build whose fp16 engine the fallback replaced: the record's 'before' is the pure engine's angle.
    replaced = Report({"tasks": list(TASKS)}, [_check("openvino", "fp16", 0.1)], fallbacks=[_fallback()])
    assert pure_angles("openvino", "fp16", [replaced]) == {"normals": PURE_ANGLE}
    assert pure_angles("onnxruntime", "fp16", [replaced]) == {}


def _tight_report(kept="mix", latency=None):
    """`build --precision fp16 --tolerances tight.json`: the fp16 engine failed, the search found a mix."""
    limit = PURE_ANGLE / 3
    if kept == "mix":  # published in the fp16 engine set's place
        engines = [_check("openvino", "fp16", 0.2, limit=limit, executed="bf16")]
    else:  # the build took fp32 instead
        engines = [_check("openvino", "fp32", 0.001, limit=limit)]
    fallback = _fallback("fixed" if kept == "mix" else "not faster", latency=latency)
    return Report({"tasks": list(TASKS)}, engines, fallbacks=[fallback])


def test_the_search_lists_each_candidate_with_its_error_and_time():
    verdict = judge_search(_tight_report(), elsewhere=[_main_report()])
    rungs = {r.name: r for r in verdict.rungs}
    assert list(rungs) == ["fp16", "fp16+fallback", "fp32"]
    assert [rungs[n].form for n in rungs] == ["16-bit", "16-bit+fp32", "fp32"]
    assert rungs["fp16"].errors == {"normals angle_deg": PURE_ANGLE} and rungs["fp16"].passed is False
    assert rungs["fp16+fallback"].errors == {"normals angle_deg": 0.2} and rungs["fp16+fallback"].passed
    # fp32's error comes from the main build (the same evaluation data), its time from the search's record.
    assert rungs["fp32"].errors == {"normals angle_deg": 0.001} and rungs["fp32"].latency_ms == 390.0
    assert [r.latency_ms for r in rungs.values()] == [160.0, 175.0, 390.0]
    assert verdict.chosen is rungs["fp16+fallback"] and rungs["fp16+fallback"].drops == {"semseg": pytest.approx(0.01),
                                                                                         "normals": pytest.approx(0.02)}
    assert verdict.verdict == "PASS"
    assert verdict.measured == "openvino-fp16+fallback: 1.00x the fastest passing (openvino-fp16+fallback), 0.45x fp32"


def test_the_search_misses_when_the_build_keeps_a_slower_engine():
    # The build took fp32 though the mix passes and is faster.
    verdict = judge_search(_tight_report(kept="fp32"), elsewhere=[_main_report()])
    assert verdict.chosen.name == "fp32"
    assert verdict.verdict == "MISS: openvino-fp16+fallback passes and is faster"
    # Timed in turn by the bench, the two are within noise: the choice stands.
    same = judge_search(_tight_report(kept="fp32"), times_ms={"openvino-fp32": 200.0, "openvino-fp16+fallback": 198.0})
    assert same.verdict == "PASS" and same.measured.startswith("openvino-fp32: 1.01x")
    # A mix kept though it is slower than fp32 by more than noise.
    slow = judge_search(_tight_report(latency={"fp16": 160.0, "fp16+fallback": 420.0, "fp32": 390.0}))
    assert slow.verdict == "MISS: openvino-fp32 passes and is faster" and "1.08x fp32" in slow.measured


def test_the_search_verdict_says_why_when_it_cannot_pass():
    assert judge_search(None, "the build failed: ExportError: boom").verdict == \
        "MISS: the build failed: ExportError: boom"
    # Before the 16-bit search exists: the fp16 engine fails the tight file and no record says what was tried.
    no_search = Report({"tasks": list(TASKS)}, [_check("openvino", "fp16", PURE_ANGLE, limit=PURE_ANGLE / 3)])
    assert judge_search(no_search).verdict.startswith("MISS: the build fails its gate (openvino-fp16: normals angle_deg")
    passing_without_record = Report({"tasks": list(TASKS)}, [_check("openvino", "fp16", 0.1)])
    assert judge_search(passing_without_record).verdict.startswith("MISS: the build ran no 16-bit search")
    # Only int8 searched: not the 16-bit search.
    int8_only = Report({"tasks": list(TASKS)}, [_check("openvino", "fp16", 0.1)],
                       fallbacks=[Fallback("openvino-int8", "fixed", "")])
    assert judge_search(int8_only).verdict.startswith("MISS: the build ran no 16-bit search")


def test_the_ladder_is_generic_over_what_auto_recorded():
    candidates = (Candidate("fp32", _check("openvino", "fp32", 0.001), 390.0),
                  Candidate("int8", _check("openvino", "int8", 2.0, limit=5.0), 250.0),
                  Candidate("fp16", _check("openvino", "fp16", PURE_ANGLE, executed="bf16"), 160.0),
                  Candidate("fp16+fallback", _check("openvino", "fp16", 0.3, executed="bf16"), 170.0, chosen=True),
                  Candidate("bf16", _check("openvino", "bf16", 0.74, limit=1.5), 158.0),
                  Candidate("fp32", _check("onnxruntime", "fp32", 0.001), 450.0))
    report = Report({"tasks": list(TASKS)}, [], auto=AutoSelection(candidates))
    rungs = build_rungs(report)
    assert [(r.backend, r.name) for r in rungs] == [
        ("onnxruntime", "fp32"), ("openvino", "bf16"), ("openvino", "fp16"), ("openvino", "fp16+fallback"),
        ("openvino", "fp32"), ("openvino", "int8")]
    fp16 = rungs[2]
    assert fp16.passed is False and fp16.ran == "bf16" and "normals angle_deg = 0.767" in fp16.failed
    assert rungs[3].chosen and rungs[3].latency_ms == 170.0 and rungs[3].drops["semseg"] == pytest.approx(0.01)
    only = build_rungs(report, forms=("16-bit", "16-bit+fp32", "fp32"))
    assert "int8" not in [r.name for r in only]
    # A build that is not auto: its fallback records, then the engines nothing searched.
    plain = build_rungs(_tight_report(), [_main_report()])
    assert [r.name for r in plain] == ["fp16", "fp16+fallback", "fp32"]


# ----------------------------------------------------------------------------- the page


def _result():
    flags = {"amx_bf16": True, "amx_int8": True, "avx2": True, "avx512_vnni": True}
    rates = [MatmulRate("openvino", "bf16", "bf16", 2048, 600.0), MatmulRate("openvino", "fp32", "fp32", 2048, 150.0)]
    rows = [{**_row("openvino-bf16", "openvino", "bf16", "bf16", 330.0), "p50_ms": 161.0, "runs": 20},
            {**_row("openvino-fp32", "openvino", "fp32", "fp32", 130.0), "p50_ms": 400.0, "runs": 10},
            {**_row("pytorch-unmerged", "pytorch", "fp32", "fp32", 64.0), "p50_ms": 820.0, "runs": 8,
             "status": "the reference"}]
    result = {"machine": {"cpu": "Test CPU", "cpus_available": 2, "threads": 2, "flags": flags,
                          "versions": {"python": "3.11"}, "load_average": {"start": [1, 1, 1], "end": [1, 1, 1]},
                          "matmul": {"start": {"gflops": 280.0, "size": 2048}, "end": {"gflops": 283.0},
                                     "reference_gflops": 283.0}},
              "model": {"flops_per_image": 53.6e9, "tasks": list(TASKS)}, "rows": rows}
    apply_yardsticks(result, rates)
    return result


def _turn(medians):
    return {"median_ms": medians, "batch": 1, "rounds_kept": 8, "rounds_dropped": 0, "contended": False}


def _extra(search):
    backbone = {"model_ms": 161.0, "backbone_ms": 94.0, "model_gflops": 334.0, "backbone_gflops": 381.0,
                "ratio": 0.88}
    return {"command": "python -m export.bench.page", "minutes": 40.0, "finished": "2026-12-06T00:00:00Z",
            "training": {"semseg": {"metric": "mIoU", "untrained": 1.6, "trained": 79.3}},
            "turns": {"choice": _turn({"openvino-bf16": 161.0, "fp16 build: openvino-fp16": 175.0,
                                       "auto: openvino-bf16": 163.0, "pytorch-eager": 565.0}),
                      "export": _turn({"merged": 508.0})},
            "fastest_passing": "openvino-bf16", "default_engine": "openvino-fp16",
            "default_label": "fp16 build: openvino-fp16", "default_failure": "", "default_fails": "",
            "auto_engine": "openvino-bf16", "search": search,
            "ladder": {"source": "build --precision auto",
                       "rungs": [vars(r) for r in build_rungs(_tight_report(), [_main_report()])]},
            "fallbacks": {}, "notes": [], "backbone": {"flops": 35.9e9, "max_abs_vs_timm": 0.0},
            "backbone_table": {"openvino-bf16": backbone, "openvino-fp32": {**backbone, "ratio": 0.78}},
            "postprocess_keys": [], "unmerged_max_abs": 7e-5, "flops": {"unmerged": 61.7e9, "adapter-free": 43.9e9},
            "profiles": None, "lscpu": "Model name: Test CPU", "json": "build/bench-docs/bench.json"}


def _search_dict(verdict):
    return {"angles": {"normals": PURE_ANGLE}, "limits": tight_tolerances({"normals": PURE_ANGLE}),
            "command": "mtlora-export build --precision fp16 --tolerances tight-tolerances.json",
            "rungs": [vars(r) for r in verdict.rungs], "measured": verdict.measured, "verdict": verdict.verdict,
            "turn": None, "notes": []}


def test_the_page_has_the_new_targets_figures_and_yardsticks(tmp_path):
    page = tmp_path / "benchmarks.md"
    search = _search_dict(judge_search(_tight_report(), elsewhere=[_main_report()]))
    write_page(_result(), _extra(search), page)
    text = page.read_text()
    verdicts = text[text.index("## 1. Verdicts"):text.index("## 2. Figures")]
    assert "within 1.15x of the fastest passing engine (openvino-bf16), passing every gate with the default " \
           "tolerances | 1.09x | PASS |" in verdicts
    assert "within 1.05x of the fastest passing candidate | 1.01x | PASS |" in verdicts
    assert "| openvino-fp16+fallback: 1.00x the fastest passing (openvino-fp16+fallback), 0.45x fp32 | PASS |" \
        in verdicts
    # The retired targets are figures now, not verdict rows.
    assert "PyTorch eager" not in verdicts and "plain backbone" not in verdicts
    figures = text[text.index("## 2. Figures (retired targets)"):text.index("## 3.")]
    assert "| 3.51x faster | at least 5x |" in figures
    assert "run at 1.24x the plain backbone's own FLOP rate" in figures  # 53.6 GFLOP x 5 / 0.565 s / 381 GFLOP/s
    assert "| 0.88x | at least 0.9x |" in figures and "| 0.88x, 0.78x |" in figures
    assert "concatenated or batched MatMul was measured slower or equal" in figures
    # The search's candidates with error and time, the limits the file set.
    assert "| openvino-fp16 | pure 16-bit | bf16 | no | normals angle_deg 0.767 | 160 |" in text
    assert "| openvino-fp16+fallback | 16-bit with fp32 layers | bf16 | yes | normals angle_deg 0.200 | 175 | n/a | kept |" \
        in text
    assert "normals 0.256 deg" in text
    # Section 3: per backend, pure 16-bit, the mix and fp32 with drops and times.
    assert "| openvino | 16-bit with fp32 layers | fp16+fallback | bf16 | yes (kept) | 175 | +0.010 | +0.020 |" in text
    # "of matmul" is each row's own precision's MatMul, named; the machine section lists the rates and sgemm.
    assert "| 55% | openvino bf16, 600 GFLOP/s |" in text  # 330 / 600
    assert "| 23% | numpy sgemm fp32, 283 GFLOP/s |" in text  # PyTorch: 64 / 283
    machine = text[text.index("## 7. The machine"):]
    assert "  - openvino bf16: 600 GFLOP/s" in machine and "fp32 sgemm (numpy, 2048^2) 280 GFLOP/s" in machine
    assert "CPU flags: amx_bf16 yes" in machine


def test_the_page_says_why_the_search_verdict_misses(tmp_path):
    page = tmp_path / "benchmarks.md"
    no_search = Report({"tasks": list(TASKS)}, [_check("openvino", "fp16", PURE_ANGLE, limit=PURE_ANGLE / 3)])
    extra = _extra(_search_dict(judge_search(no_search)))
    extra["default_fails"] = "normals angle_deg = 0.767, limit <= 0.5"
    write_page(_result(), extra, page)
    text = page.read_text()
    assert "| n/a | MISS: the build fails its gate (openvino-fp16: normals angle_deg = 0.767" in text
    assert "| 1.09x | MISS: it fails its gate with the default tolerances (normals angle_deg = 0.767" in text


def test_page_help_runs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "export.bench.page", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "--rerender" in done.stdout


def test_a_bench_json_from_before_the_yardsticks_still_renders(tmp_path):
    # --rerender of an older run: no engine MatMul rates, search, ladder or fp16 build of its own.
    result = _result()
    del result["machine"]["engine_matmul"]
    for row in result["rows"]:
        for key in ("matmul_yardstick", "matmul_gflops", "fraction_of_sgemm"):
            row.pop(key)
        row["fraction_of_matmul"] = row["achieved_gflops"] / 283.0  # what older runs divided by
    extra = _extra(None)
    for key in ("search", "ladder", "default_label", "default_failure", "lscpu"):
        extra.pop(key)
    extra["turns"]["choice"]["median_ms"]["openvino-fp16"] = 175.0
    page = tmp_path / "benchmarks.md"
    write_page(result, extra, page)
    text = page.read_text()
    assert "(openvino-fp16) within 1.15x of the fastest passing engine (openvino-bf16), passing every gate with the " \
           "default tolerances | 1.09x | PASS |" in text
    assert "## 3. Pure 16-bit" not in text and "The mixed-precision search" not in text
    assert "| 117% | numpy sgemm fp32 |" in text  # openvino-bf16, 330 / 283: the rate it was divided by, named


def _video(ratio, ceiling, label_size=(640, 480)):
    return {"ratio": ratio, "ceiling_on_this_machine": ceiling, "frame_size": list(label_size), "threads": 1,
            "video_frames_per_s": 100 * ratio, "infer_images_per_s": 100.0, "infer_ms": 10.0, "infer_cpu_ms": 10.0,
            "other_cpu_ms": 5.0, "cores": 2, "rounds": 5, "contended": False,
            "stage_cpu_ms_per_frame": {"decode": 2.0, "preprocess": 1.0, "infer": 10.0, "postprocess": 1.0,
                                       "encode": 1.0}}


def test_the_application_targets_are_verdict_rows_with_the_ceiling(tmp_path):
    page = tmp_path / "benchmarks.md"
    extra = _extra(None)
    extra["application"] = {
        "video": {"default model": _video(0.66, 0.88), "bench model": _video(0.91, 1.0)},
        "one_vs_all": {"engine": "/x/onnxruntime-fp32", "layout": "split", "task": "semseg", "all_tasks_ms": 400.0,
                       "one_task_ms": 220.0, "ratio": 0.55}}
    write_page(_result(), extra, page)
    text = page.read_text()
    verdicts = text[text.index("## 1. Verdicts"):text.index("## 2. Figures")]
    # Below 0.85x but above 0.85 of the ceiling: a miss of the target, a pass of the restatement, both said.
    assert "(default model, 640x480 clip, 1 engine thread(s)) | 0.66x (66.0 vs 100.0 per s); ceiling 0.88x, so " \
           "0.75 of it | MISS; restated (at least 0.85 of the ceiling): MISS |" in verdicts
    assert "(bench model, 640x480 clip, 1 engine thread(s)) | 0.91x (91.0 vs 100.0 per s); ceiling 1.00x, so 0.91 " \
           "of it | PASS |" in verdicts
    assert "| one task (semseg) at run time at most 0.85x the all-tasks time (onnxruntime-fp32, split layout) | " \
           "0.55x (220.0 vs 400.0 ms) | PASS |" in verdicts
    assert "- default model: CPU ms per frame decode 2.0, preprocess 1.0, infer 10.0" in text
    assert "ceiling = min(1, 2 cores x 10.0 / (10.0 + 5.0)) = 0.88" in text


def test_a_ratio_within_the_ceiling_passes_the_restatement():
    from export.bench.application import verdict_rows

    [row] = verdict_rows({"video": {"m": _video(0.76, 0.88)}})
    assert row[2] == "MISS; restated (at least 0.85 of the ceiling): PASS"


def test_the_fp16_graphs_search_is_a_verdict_with_its_nodes(tmp_path):
    from export.bench.page import GRAPH_FRACTION

    page = tmp_path / "benchmarks.md"
    extra = _extra(None)
    angles = {"normals": 0.0209}
    extra["graph_search"] = {
        "angles": angles, "limits": tight_tolerances(angles, GRAPH_FRACTION),
        "command": "mtlora-export build --backend onnxruntime --precision fp16 --tolerances t.json "
                   "--int8-fallback always --out build-fp16-graph-tight",
        "layers": [{"node": "/proj/Conv", "task": "normals", "local_error": 3.1e-4},
                   {"node": "/v_3/MatMul", "task": "normals", "local_error": 2.7e-4}],
        "measured": "2 node(s) in fp32: normals angle_deg 0.021 -> 0.015 (limit 0.016); 34 set(s) judged",
        "verdict": "PASS", "notes": ["the search for onnxruntime-fp16: not faster, 2 layer(s) in fp32"]}
    write_page(_result(), extra, page)
    text = page.read_text()
    verdicts = text[text.index("## 1. Verdicts"):text.index("## 2. Figures")]
    assert "that the pure graph fails (normals limit 0.75x its angle) is met with the fp32 nodes the search finds, " \
           "shown by its record | 2 node(s) in fp32: normals angle_deg 0.021 -> 0.015 (limit 0.016); 34 set(s) " \
           "judged | PASS |" in verdicts
    section = text[text.index("### The fp16 graph's search"):text.index("## 2. Figures")]
    assert "sets `max_angle_deg` to 0.75x it (normals 0.016 deg)" in section
    assert "| `/proj/Conv` | normals | 0.00031 |" in section and "| `/v_3/MatMul` | normals | 0.00027 |" in section
    assert "- the search for onnxruntime-fp16: not faster, 2 layer(s) in fp32" in section


def test_the_eager_figure_says_why_from_what_was_measured():
    from export.bench.page import _eager_reason

    assert _eager_reason(1.24, 0.88).startswith("faster per FLOP than the backbone alone")
    below = _eager_reason(0.97, 0.73)
    assert below.startswith("the graph keeps 0.73x") and "faster per FLOP" not in below
    assert _eager_reason(0.7, 0.73) == "the graph keeps 0.73x, enough."
    assert _eager_reason(None, 0.73) == "not measured here."
