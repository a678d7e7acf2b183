"""`python -m export.bench.page` (`make bench`): regenerate docs/benchmarks.md on this machine.

It answers the speed questions of the issues on the machine at hand, as ratios from one run: which
engine is the fastest among those that pass every task's gate, how far from it `build --precision
fp16` (the command users type most) and `build --precision auto` land, whether INT8 pays off at batch
8, how the best engine compares with PyTorch eager, and how much of the plain backbone's FLOP rate
the four-task graph keeps in each engine and precision. Every verdict is timed in turn, in one
process, so a busy spell of this shared machine slows the compared engines alike.

The model is an MTLoRA Swin-T at 448x448 with four tasks (shared rank 64, task rank 4, scale 4),
briefly trained on the synthetic set (`export.bench.model`), so an engine that changes what the
model predicts fails its task's gate for a reason.

In `build/bench-docs/` (steps are reused when their inputs are unchanged):

1. trains the benchmark model (cached) and writes the adapter-free network;
2. builds every ONNX Runtime and OpenVINO engine at fp32/fp16/int8 (and OpenVINO's bf16) with
   `mtlora-export build`
   (INT8 calibrated on synthetic 448 images), the same with `--postprocess`, and the engine
   `--precision auto` picks;
3. builds the plain backbone in every engine and precision (`export.bench.plain_backbone`);
4. times every engine and PyTorch eager in fresh workers, then the verdicts' engines in turn;
5. exports the unmerged model and the adapter-free network and profiles the three fp32 graphs;
6. writes the page and `build/bench-docs/bench.json`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from engines.registry import choose_backend
from export.artifacts.builddir import BuildDir
from export.artifacts.files import write_text_atomic
from export.bench.breakdown import (
    flops_breakdown,
    profile_findings,
    profile_table,
    structural_lines,
    time_breakdown,
)
from export.bench.model import (
    IMG_SIZE,
    SCALE,
    SHARED_RANK,
    TASK_RANK,
    TASKS,
    TRAIN_SIZE,
    adapter_free_checkpoint,
    check_against_torch,
    export_adapter_free,
    export_unmerged,
    train_bench_model,
    training_summary,
)
from export.bench.options import BenchOptions
from export.bench.plain_backbone import build_backbones
from export.bench.profile import profile_graphs
from export.bench.run import benchmark, build_for_bench, write_json
from export.bench.tables import MEASUREMENT_NOTES, PERF_HEADER, accuracy_rows, md_table, perf_rows
from export.bench.targets import PASSED, Target, engine_targets, runtime_targets, torch_targets
from export.bench.timing import interleaved_latency, wait_for_quiet
from export.onnx.flops import count_flops
from export.pipeline.speed import cpu_flags

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"
WORK = ROOT / "build" / "bench-docs"
CALIB_SAMPLES = 32
EVAL_SAMPLES = 8
ROUNDS = 8  # rounds of in-turn timing per verdict group

# Issue #12's targets (they replace the earlier ones, which were set from one machine's timings).
DEFAULT_VS_FASTEST = 1.1  # `build --precision fp16` (automatic backend) within this of the fastest passing engine
AUTO_VS_FASTEST = 1.05  # `--precision auto`'s pick within this of the fastest passing candidate
BEST_VS_EAGER = 5.0  # the fastest passing engine at least this much faster than PyTorch eager, on an AMX CPU
MERGED_VS_BACKBONE = 0.9  # the four-task graph keeps at least this share of the plain backbone's GFLOP/s
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # what makes int8 faster on an x86 CPU
AMX = ("amx_bf16", "amx_int8")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _image(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, IMG_SIZE, IMG_SIZE), dtype=np.float32)


# ----------------------------------------------------------------------------- in-turn timing


def _open_engine(stack: ExitStack, build_dir: Path, key: str, threads: int):
    from export.artifacts.engineset import EngineSet, load_runner

    return stack.enter_context(load_runner(EngineSet.read(BuildDir(build_dir).engine(key)), threads))


def time_in_turn(engines: dict[str, tuple[Path, str]], threads: int, batch: int, eager_checkpoint: Path | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Median seconds of each engine ({label: (build dir, engine key)}), timed in turn in this process;
    `eager_checkpoint` adds PyTorch eager (unmerged fp32), `extra` other {label: infer callable}."""
    image = _image(batch)
    with ExitStack() as stack:
        infers = {}
        for label, (build_dir, key) in engines.items():
            runner = _open_engine(stack, build_dir, key, threads)
            infers[label] = lambda r=runner: r.infer({"image": image})
        for label, runner in (extra or {}).items():
            runner = stack.enter_context(runner)
            infers[label] = lambda r=runner: r.infer({r.input_names[0]: image})
        if eager_checkpoint is not None:
            import torch

            from mtlora.loading import load_any

            torch.set_num_threads(threads)
            model = load_any(eager_checkpoint, IMG_SIZE).float().eval()
            tensor = torch.from_numpy(image)

            def eager():
                with torch.inference_mode():
                    return model(tensor)

            infers["pytorch-eager"] = eager
        turn = interleaved_latency(infers, ROUNDS)
    turn["median_ms"] = {name: float(np.median(s) * 1e3) for name, s in turn["seconds"].items()}
    turn["batch"] = batch
    return turn


# ----------------------------------------------------------------------------- which engines


def passing_rows(result: dict, batch: int) -> list[dict]:
    return [r for r in result["rows"] if r["kind"] == "engine" and r["status"] == PASSED and r.get("batch_size") == batch
            and "p50_ms" in r]


def fastest(rows: list[dict]) -> dict | None:
    return min(rows, key=lambda r: r["p50_ms"]) if rows else None


def auto_pick(build_dir: Path) -> str | None:
    """The engine `build --precision auto` kept: of the per-backend choices its build.json records, the one
    it timed fastest (None when the build made no choice)."""
    from export.artifacts.records import read_build_record
    from export.pipeline.auto import candidate_precision

    build = BuildDir(build_dir)
    if not build.record.is_file():
        return None
    auto = read_build_record(build).get("auto") or {}
    chosen, latency = auto.get("chosen") or {}, auto.get("latency_ms") or {}
    if not chosen:
        return None
    backend = min(chosen, key=lambda b: latency.get(b, {}).get(chosen[b], float("inf")))
    return f"{backend}-{candidate_precision(chosen[backend])}"


def build_auto(checkpoint: Path, out: Path, threads: int | None) -> str | None:
    """Run `mtlora-export build --precision auto` and return the engine it picked."""
    command = [sys.executable, "-m", "export.cli", "build", str(checkpoint), "--precision", "auto",
               "--backend", "onnxruntime", "--backend", "openvino", "--img-size", str(IMG_SIZE),
               "--calib-data", "synthetic", "--calib-samples", str(CALIB_SAMPLES), "--eval-samples", str(EVAL_SAMPLES),
               "--out", str(out)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True)
    say(f"[bench-docs] build --precision auto exited {done.returncode}")
    if done.returncode != 0:
        say(done.stdout[-2000:] + done.stderr[-2000:])
    return auto_pick(out)


# ----------------------------------------------------------------------------- the page


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(value: float | None, target: float, at_least: bool, applies: bool = True) -> str:
    if not applies:
        return "does not apply here"
    if value is None:
        return "NOT MEASURED"
    return "PASS" if (value >= target if at_least else value <= target) else "MISS"


def lscpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L2 cache", "L3 cache",
            "Hypervisor vendor")
    return "\n".join(line for line in text.splitlines() if line.split(":")[0].strip() in keep)


def _turn_line(turn: dict) -> str:
    medians = ", ".join(f"{name} {ms:.0f} ms" for name, ms in turn["median_ms"].items())
    state = " (contended throughout: no quiet round, unreliable)" if turn["contended"] else ""
    return (f"In turn at batch {turn['batch']}: {turn['rounds_kept']} rounds kept, {turn['rounds_dropped']} dropped as "
            f"contended{state}; medians {medians}.")


def write_page(result: dict, extra: dict, path: Path) -> None:
    machine = result["machine"]
    matmul = machine["matmul"]
    flags = machine["flags"]
    flops = result["model"]["flops_per_image"]
    choice, int8 = extra["turns"]["choice"], extra["turns"].get("int8")
    ms = choice["median_ms"]
    best, default, auto = extra["fastest_passing"], extra["default_engine"], extra.get("auto_engine")
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{extra['command']}` (`make bench`), {extra['minutes']:.0f} minutes, finished {extra['finished']}.  ",
        f"Machine: {machine['cpu']}, {machine['cpus_available']} CPU(s), {machine['threads']} thread(s) per engine, "
        f"fp32 sgemm {matmul['reference_gflops']:.0f} GFLOP/s; CPU flags: "
        + ", ".join(f for f, on in flags.items() if on) + ". Details in section 5.",
        "",
        f"Model: MTLoRA Swin-T, {IMG_SIZE}x{IMG_SIZE} input, tasks " + ", ".join(TASKS) + f"; shared rank {SHARED_RANK}, "
        f"task rank {TASK_RANK}, scale {SCALE:g}; {flops / 1e9:.1f} GFLOP per image (2 x MACs of MatMul/Gemm/Conv in "
        f"the merged fp32 graph). Trained briefly on the synthetic set at {TRAIN_SIZE}x{TRAIN_SIZE} (frozen seeded "
        "backbone; adapters and decoders learn) until every task clearly beats an untrained copy:",
        "",
        md_table(["task", "metric", "untrained", "trained"],
                 [[t, r["metric"], _fmt(r["untrained"]), _fmt(r["trained"])] for t, r in extra["training"].items()]),
        "",
        f"Every engine is checked against the PyTorch model on {EVAL_SAMPLES} labelled synthetic {IMG_SIZE}x{IMG_SIZE} "
        "images (plus the export's 2 reference inputs), task by task; \"passes\" means every gate of every task.",
        "",
        "## 1. Verdicts (timed in turn, one process)",
        "",
    ]
    rows = []
    default_ratio = ms[default] / ms[best] if default in ms and best in ms else None
    default_verdict = _verdict(default_ratio, DEFAULT_VS_FASTEST, False)
    default_fails = extra.get("default_fails")
    if default_fails:
        # Faster than every passing engine is no pass when the engine itself fails a gate.
        default_verdict = f"MISS: it fails its gate ({default_fails})"
    rows.append([f"`build --precision fp16` ({default}) within {DEFAULT_VS_FASTEST}x of the fastest passing engine "
                 f"({best})", f"{_fmt(default_ratio)}x", default_verdict])
    auto_ms = ms.get(f"auto: {auto}")  # timed under its own label: the same key may be a main-build engine
    auto_ratio = auto_ms / ms[best] if auto_ms and best in ms else None
    rows.append([f"`--precision auto` ({auto or 'not available'}) within {AUTO_VS_FASTEST}x of the fastest passing "
                 "candidate", f"{_fmt(auto_ratio)}x", _verdict(auto_ratio, AUTO_VS_FASTEST, False)])
    int8_accel = any(flags.get(f) for f in INT8_FLAGS)
    if int8:
        i8, b16 = extra["best_int8"], extra["best_16bit"]
        int8_ratio = int8["median_ms"][b16] / int8["median_ms"][i8] if i8 and b16 else None
        rows.append([f"INT8 ({i8}) faster than the best 16-bit engine ({b16}) at batch 8",
                     f"{_fmt(int8_ratio)}x", _verdict(int8_ratio, 1.0, True, int8_accel) if i8 and b16 else
                     "NOT MEASURED (no passing INT8 or 16-bit engine)"])
    eager_ratio = ms["pytorch-eager"] / ms[best] if best in ms else None
    on_amx = any(flags.get(f) for f in AMX)
    rows.append([f"the fastest passing engine ({best}) at least {BEST_VS_EAGER:g}x faster than PyTorch eager "
                 "(unmerged fp32), batch 1", f"{_fmt(eager_ratio)}x",
                 _verdict(eager_ratio, BEST_VS_EAGER, True) + ("" if on_amx else " (target set for AMX CPUs; this one "
                                                              "has no AMX, the ratio is recorded)")])
    for key, ratio in ((k, v["ratio"]) for k, v in extra["backbone_table"].items()):
        rows.append([f"{key}: four-task graph's GFLOP/s at least {MERGED_VS_BACKBONE}x the plain backbone's "
                     "(same engine and precision)", f"{_fmt(ratio)}x", _verdict(ratio, MERGED_VS_BACKBONE, True)])
    lines += [md_table(["target", "measured", "verdict"], rows), "", _turn_line(choice)]
    if int8:
        lines += ["", _turn_line(int8)]
    if extra.get("fallbacks"):
        lines += ["", "What the build's INT8 fallback did (an int8 engine that fails a gate and is no faster than a "
                  "passing 16-bit engine of its backend stays as calibrated, and the build says why):", "",
                  *(f"- {key}: {line}" for key, line in extra["fallbacks"].items())]
    if not int8_accel:
        lines += ["", "This CPU has none of " + ", ".join(INT8_FLAGS) + ": no int8 dot-product instructions, so INT8 "
                  "is not expected to beat 16-bit here."]
    lines += ["", *extra["notes"], ""]

    lines += ["## 2. Engines", "",
              f"Every engine `mtlora-export build` makes here (ONNX Runtime and OpenVINO, fp32 / fp16 / int8, and "
              "OpenVINO's bf16), each in "
              "its own fresh worker process, and PyTorch eager. `precision` says what was asked for and, where it "
              "differs, what ran: OpenVINO's fp16 runs the fastest 16-bit format measured on the device, and an "
              "INT8 engine's float remainder likewise. INT8 is calibrated on "
              f"{CALIB_SAMPLES} synthetic images.", "",
              md_table(PERF_HEADER, [r for r in perf_rows(result) if not r[0].startswith(("onnx-", "backbone"))]), ""]
    header_acc, rows_acc = accuracy_rows(result)
    lines += [md_table(header_acc, [r for r in rows_acc if not r[0].startswith(("onnx-", "backbone"))]), ""]

    pp = extra["turns"].get("postprocess")
    if pp:
        lines += ["### In-graph post-processing", "",
                  "`--postprocess` exports what a device application wants (class ids as uint8, probabilities, unit "
                  "normals) instead of full-resolution logits: per image, "
                  f"{extra['output_bytes']['raw'] / 2**20:.1f} MiB of outputs become "
                  f"{extra['output_bytes']['postprocessed'] / 2**20:.1f} MiB.", "",
                  md_table(["engine", "raw outputs ms", "post-processed ms", "ratio"],
                           [[k, _fmt(pp["median_ms"][k], ".0f"), _fmt(pp["median_ms"][f"{k} --postprocess"], ".0f"),
                             f"{_fmt(pp['median_ms'][k] / pp['median_ms'][f'{k} --postprocess'])}x"]
                            for k in extra["postprocess_keys"]]), "", _turn_line(pp), ""]

    gf = extra["backbone"]
    lines += ["## 3. The four-task graph against the plain backbone", "",
              f"The plain backbone is the same Swin-T's `forward_features` alone ({gf['flops'] / 1e9:.1f} GFLOP per "
              f"image; matches timm to {gf['max_abs_vs_timm']:.1e}), built into the same engine and precision with the "
              "same graph preparation. GFLOP/s is each graph's own FLOPs times images/s, timed in turn with the "
              "four-task engine of the same engine and precision (batch 1).", "",
              md_table(["engine", "four-task ms", "four-task GFLOP/s", "backbone ms", "backbone GFLOP/s", "ratio"],
                       [[k, _fmt(v["model_ms"], ".0f"), _fmt(v["model_gflops"], ".0f"), _fmt(v["backbone_ms"], ".0f"),
                         _fmt(v["backbone_gflops"], ".0f"), f"{_fmt(v['ratio'])}x"]
                        for k, v in extra["backbone_table"].items()]), ""]
    lines += ["## 4. Export: merged vs unmerged vs adapter-free (ONNX Runtime CPU, fp32, batch 1)", "",
              f"The merged export (what engines are built from) against the unmerged model traced as it is (max abs "
              f"difference to PyTorch {extra['unmerged_max_abs']:.1e}) and the same network without adapters. The FLOP "
              f"ratios stand: unmerged/merged {extra['flops']['unmerged'] / flops:.3f}, merged/adapter-free "
              f"{flops / extra['flops']['adapter-free']:.3f}.", "",
              _turn_line(extra["turns"]["export"]), ""]
    if extra.get("profiles"):
        lines += [f"ONNX Runtime's profiler at batch 1, ms by op type, each node its fastest of {extra['profile_runs']} "
                  "runs:", "", profile_table(extra["profiles"]), ""]
        lines += [f"- {finding}" for finding in extra.get("findings", [])]
        lines += ["", *structural_lines(extra["breakdown"], extra["flops_breakdown"]), ""]

    versions = machine["versions"]
    load = machine["load_average"]
    busy = [r["cpu_busy"] for r in result["rows"] if r.get("cpu_busy") is not None]
    discarded = sum(r.get("runs_discarded") or 0 for r in result["rows"])
    lines += [
        "## 5. The machine and the measurement", "",
        "```", lscpu() or machine["cpu"], "```", "",
        "- CPU flags: " + ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in flags.items()),
        f"- {machine['cpus_available']} CPU(s) available; every engine and PyTorch ran with {machine['threads']} "
        "thread(s).",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- fp32 sgemm {matmul['start']['gflops']:.0f} GFLOP/s at the start, {matmul['end']['gflops']:.0f} at the end; "
        f"load average (1/5/15 min) {load['start']} at the start, {load['end']} at the end; workers used "
        f"{_fmt(min(busy) if busy else None)} to {_fmt(max(busy) if busy else None)} CPU-seconds per second; "
        f"{discarded} timed runs were discarded because other processes took CPU time during them.",
        "- How each column is measured: " + MEASUREMENT_NOTES,
        f"- raw results: `{extra['json']}`.",
        "",
    ]
    write_text_atomic(path, "\n".join(lines))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench.page", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="threads per engine (default: every CPU)")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timed runs per format and batch size")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="seconds to wait, before each format, for other processes to go quiet")
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--rerender", action="store_true",
                        help="only write the page again from the last run's bench.json (no building, no timing)")
    args = parser.parse_args(argv)
    if args.rerender:
        return rerender(args.page, args.work)
    command = shlex.join(["python", "-m", "export.bench.page", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    checkpoint = train_bench_model(work / "trained", say)
    free_ckpt = adapter_free_checkpoint(work / "checkpoint-adapter-free")
    build_options = dict(calib_data="synthetic", calib_samples=CALIB_SAMPLES, eval_samples=EVAL_SAMPLES,
                         threads=args.threads, img_size=IMG_SIZE)
    say("[bench-docs] building every engine")
    build_dir, pp_dir = work / "build", work / "build-postprocess"
    report, failures = build_for_bench(checkpoint, build_dir, say, backends=("onnxruntime", "openvino"),
                                       precisions=("all", "bf16"), **build_options)
    default_backend, _ = choose_backend("auto")
    default_engine = f"{default_backend}-fp16"
    say("[bench-docs] building with --postprocess")
    build_for_bench(checkpoint, pp_dir, say, backends=("onnxruntime", "openvino"), precisions=("fp16", "bf16", "int8"),
                    postprocess=True, **build_options)
    auto_engine = build_auto(checkpoint, work / "build-auto", args.threads)
    split_dir = work / "build-split"
    say("[bench-docs] building the split layout (fp32) to time one task against all at run time")
    build_for_bench(checkpoint, split_dir, say, backends=("onnxruntime",), precisions=("fp32",), layout="split",
                    **build_options)

    opts = BenchOptions(batch_sizes=(1, 8), threads=args.threads, warmup=1, runs=20, budget_s=args.budget,
                        quiet_wait_s=args.quiet_wait)
    threads = opts.thread_count
    model_flops = count_flops(BuildDir(build_dir).export / "model.onnx")
    targets: list[Target] = [t for t in torch_targets(checkpoint, IMG_SIZE) if t.name == "pytorch-unmerged"]
    for t in targets:
        t.batch_sizes = (1,)  # PyTorch eager at batch 8 takes minutes on two cores
    targets += engine_targets(build_dir, report, failures)
    # What an application sees, per layout: one task at run time against all, and a video end to end.
    targets += runtime_targets(build_dir)
    targets += runtime_targets(split_dir, all_tasks=True, video=False)
    result = benchmark(targets, opts, input_size=IMG_SIZE, model_flops=model_flops, say=say, command=command,
                       model={"build_dir": str(build_dir), "tasks": list(TASKS), "layout": "single",
                              "checkpoint": str(checkpoint)})
    result["machine"]["flags"] = cpu_flags()

    best = fastest(passing_rows(result, 1))
    best_key = best["name"] if best else None
    notes = []
    if best is None:
        notes.append("No engine passed every gate: the verdicts that need the fastest passing engine are not measured.")
    # The verdict groups, each timed in turn.
    choice = {k: (build_dir, k) for k in dict.fromkeys(filter(None, [best_key, default_engine]))}
    if auto_engine:
        choice[f"auto: {auto_engine}"] = (work / "build-auto", auto_engine)
    say("[bench-docs] timing the choices in turn (batch 1)")
    if opts.quiet_wait_s > 0:
        wait_for_quiet(opts.quiet_wait_s)
    turns = {"choice": time_in_turn(choice, threads, 1, eager_checkpoint=checkpoint)}
    b8 = passing_rows(result, 8)
    best_int8 = fastest([r for r in b8 if r["precision_requested"] == "int8"])
    best_16 = fastest([r for r in b8 if r["precision_requested"] in ("fp16", "bf16")])
    if best_int8 and best_16:
        say("[bench-docs] timing the best INT8 and 16-bit engines in turn (batch 8)")
        turns["int8"] = time_in_turn({r["name"]: (build_dir, r["name"]) for r in (best_int8, best_16)}, threads, 8)

    say("[bench-docs] the plain backbone in every engine and precision")
    keys = [d.name for d in BuildDir(build_dir).engine_dirs()]  # sorted
    backbone = build_backbones(checkpoint, work / "backbone", keys, IMG_SIZE, CALIB_SAMPLES, args.threads, say)
    backbone_table = {}
    from engines.registry import get_backend

    for key in keys:
        backend = key.partition("-")[0]
        runner = get_backend(backend).load(backbone["engines"][key], threads=threads)
        turn = time_in_turn({key: (build_dir, key)}, threads, 1, extra={"backbone": runner})
        model_ms, backbone_ms = turn["median_ms"][key], turn["median_ms"]["backbone"]
        row = {"model_ms": model_ms, "backbone_ms": backbone_ms, "model_gflops": model_flops["flops"] / model_ms / 1e6,
               "backbone_gflops": backbone["flops"] / backbone_ms / 1e6}
        row["ratio"] = row["model_gflops"] / row["backbone_gflops"]
        backbone_table[key] = row

    pp_keys = [k for k in (default_engine, best_key) if k and (BuildDir(pp_dir).engine(k) / "engine.json").is_file()]
    pp_keys = list(dict.fromkeys(pp_keys))
    if pp_keys:
        say("[bench-docs] post-processing in the graph, in turn")
        turns["postprocess"] = time_in_turn(
            {**{k: (build_dir, k) for k in pp_keys}, **{f"{k} --postprocess": (pp_dir, k) for k in pp_keys}}, threads, 1)

    say("[bench-docs] exporting the unmerged model and the adapter-free network")
    unmerged_onnx = export_unmerged(checkpoint, work / "unmerged" / "model.onnx")
    free_onnx = export_adapter_free(free_ckpt, work / "adapter-free")
    from engines.onnxruntime.runner import OnnxRuntimeRunner

    turns["export"] = time_in_turn({"merged": (build_dir, "onnxruntime-fp32")}, threads, 1, extra={
        "unmerged": OnnxRuntimeRunner(unmerged_onnx, intra_op_threads=threads),
        "adapter-free": OnnxRuntimeRunner(free_onnx, intra_op_threads=threads)})
    profile_runs = 5
    profiles = profile_graphs({"merged": BuildDir(build_dir).export / "model.onnx", "unmerged": unmerged_onnx,
                               "adapter-free": free_onnx}, threads, profile_runs)
    free_flops = count_flops(free_onnx)
    channels = _channels(build_dir)
    raw_bytes = sum(4 * c * IMG_SIZE * IMG_SIZE for c in channels.values())
    pp_bytes = sum((1 if t in ("semseg", "human_parts") else 4 * c) * IMG_SIZE * IMG_SIZE for t, c in channels.items())
    extra = {
        "command": command, "minutes": (time.perf_counter() - started) / 60, "training": training_summary(checkpoint),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "turns": turns, "fastest_passing": best_key, "default_engine": default_engine, "auto_engine": auto_engine,
        "default_fails": _failed_checks(report, default_engine),
        "fallbacks": _fallback_lines(report),
        "best_int8": best_int8["name"] if best_int8 else None, "best_16bit": best_16["name"] if best_16 else None,
        "backbone": {k: v for k, v in backbone.items() if k != "engines"}, "backbone_table": backbone_table,
        "postprocess_keys": pp_keys,
        "output_bytes": {"raw": raw_bytes, "postprocessed": pp_bytes},
        "unmerged_max_abs": check_against_torch(checkpoint, unmerged_onnx),
        "flops": {"unmerged": count_flops(unmerged_onnx)["flops"], "adapter-free": free_flops["flops"]},
        "profiles": profiles, "profile_runs": profile_runs, "findings": profile_findings(profiles),
        "breakdown": {"merged": time_breakdown(BuildDir(build_dir).export / "model.onnx", profiles["merged"]),
                      "adapter-free": time_breakdown(free_onnx, profiles["adapter-free"])},
        "flops_breakdown": {"merged": flops_breakdown(BuildDir(build_dir).export / "model.onnx", model_flops),
                            "adapter-free": flops_breakdown(free_onnx, free_flops)},
        "notes": notes + [f"{k}: failed to build: {v}" for k, v in failures.items()],
    }
    json_path = work / "bench.json"
    extra["json"] = str(json_path.relative_to(ROOT)) if json_path.is_relative_to(ROOT) else str(json_path)
    result["bench_docs"] = {k: v for k, v in extra.items() if k != "command"}
    write_json(result, json_path)
    write_page(result, extra, args.page)
    say(f"[bench-docs] wrote {args.page} ({extra['minutes']:.1f} min)")
    return 0


def _failed_checks(report, key: str) -> str:
    """'task check value > limit; ...' for the checks engine `key` fails in `report` ('' when it passes)."""
    engine = report.engine(key) if report is not None else None
    if engine is None:
        return ""
    return "; ".join(f"{task} {c.describe()}" for task, r in engine.tasks.items() for c in r.failed)


def _fallback_lines(report) -> dict[str, str]:
    """What the build's INT8 fallback did per int8 engine (why an int8 engine that fails stayed so)."""
    return {f.engine: f"{f.verdict}: {f.message}" for f in report.fallbacks} if report is not None else {}


def rerender(page: Path, work: Path) -> int:
    """Write the page again from WORK/bench.json (after a change to the page's text, without timing again)."""
    import json

    result = json.loads((work / "bench.json").read_text())
    extra = {**result["bench_docs"], "command": result["command"]}
    extra.setdefault("finished", result["created"])
    if "fallbacks" not in extra:
        from export.checking.report import read_report

        record = BuildDir(work / "build").report
        extra["fallbacks"] = _fallback_lines(read_report(record) if record.is_file() else None)
    write_page(result, extra, page)
    say(f"[bench-docs] wrote {page} from {work / 'bench.json'}")
    return 0


def _channels(build_dir: Path) -> dict[str, int]:
    from export.artifacts.manifest import ExportInfo

    return dict(ExportInfo.read(BuildDir(build_dir).export).interface.channels)


if __name__ == "__main__":
    sys.exit(main())
