"""Latency, throughput, memory and achieved FLOP rate of a build's engines, next to PyTorch eager.

Each benchmark target (an engine of the build, a plain ONNX file, or the PyTorch
model unmerged or merged) runs in a fresh worker process, `python -m
export.bench.worker --worker SPEC RESULT`, so that one runtime's allocations, thread
pools and caches never show up in another's numbers. In the worker:

- the target is loaded, then for each batch size (ascending): `warmup` untimed
  runs, then timed runs until `budget_s` seconds have passed (at least
  `MIN_RUNS`) or `runs` runs are done;
- this is often a shared machine, so a run during which other processes (or
  the hypervisor, as steal time, both read from /proc/stat) took more than
  `CONTENDED_SHARE` of a CPU is discarded and retried, a few times at most;
  a row that could not get `MIN_RUNS` quiet runs keeps all of them and says so;
- a run is one `infer` call, numpy in and numpy out, timed with
  `time.perf_counter`; p50/p90/p99 are numpy's linear-interpolation percentiles
  of those times, and images/s is batch x runs / total timed seconds;
- peak memory is the process's resident-set high-water mark (VmHWM of
  /proc/self/status), reset to the current RSS (/proc/self/clear_refs) after
  loading and before each batch size: it counts the interpreter, the runtime
  libraries and the loaded model, plus what that batch size's runs added;
- `cpu_busy` is the worker's CPU seconds per wall second over the kept runs
  (close to the thread count when every thread had work), `others_cpu_busy`
  the same for everything else on the machine.

The model's FLOPs are counted once, per image, from the fp32 ONNX graph: two
per multiply-accumulate of every MatMul, Gemm and Conv, from the shapes ONNX
shape inference gives at batch 1 (elementwise ops, softmax and norms are not
counted). An engine's achieved rate is those FLOPs times its images/s, reported
as a fraction of a matrix-multiply rate of this machine: numpy's BLAS sgemm on a
large square matrix (measured in the benchmarking process at the start and the
end of the run with the same thread count; the better of the two), or, where the
benchmark measured it (the bench page: `export.bench.engine_matmul`), a large
MatMul built into the row's own backend at the precision the row executed.
Against sgemm an int8 or bf16 engine can exceed 1; against its own precision's
MatMul it says how much of that precision's speed the model's graph keeps.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.bench.machine import available_cpus
from export.bench.options import BenchOptions
from export.bench.targets import Target
from export.bench.timing import MIN_RUNS, latency_stats, time_runs
from export.errors import ExportError

MIB = 2**20
WORKER_TIMEOUT_S = 3600


def _status_kib(*keys: str) -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in keys:
                values[name] = int(rest.split()[0])
    except OSError:
        pass
    return values


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    kib = _status_kib("VmHWM").get("VmHWM")
    if kib is None:  # no /proc: getrusage's high-water mark (KiB on Linux), which cannot be reset
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def _rss_mib() -> float:
    return _status_kib("VmRSS").get("VmRSS", 0) / 1024


def _open_target(spec: dict[str, Any], threads: int):
    """(infer(batch_array) -> outputs, precision actually executed, close, notes) for a worker's target."""
    kind, load = spec["kind"], spec["load"]
    if kind == "engine":
        from export.artifacts.engineset import EngineSet, load_runner

        runner = load_runner(EngineSet.read(Path(load["directory"])), threads)
        runner.__enter__()
        input_name = "image"
        tasks = load.get("tasks")
        if tasks and hasattr(runner, "run_tasks"):  # a split set: the backbone and only these heads
            def infer(x):
                return runner.run_tasks({input_name: x}, tasks)
        else:  # a single graph runs whole whatever is asked of it
            def infer(x):
                return runner.infer({input_name: x})
        return (infer, getattr(runner, "precision_executed", ""),
                lambda: runner.__exit__(None, None, None), list(getattr(runner, "notes", [])))

    if kind == "artifact":  # one engine file of a backend, not an engine set (the per-precision MatMul)
        from engines.registry import get_backend

        runner = get_backend(load["backend"]).load(load["path"], threads=threads)
        runner.__enter__()
        name = runner.input_names[0]
        return ((lambda x: runner.infer({name: x})), runner.precision_executed,
                lambda: runner.__exit__(None, None, None), list(getattr(runner, "notes", [])))
    if kind == "onnx":
        from engines.onnxruntime.runner import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(load["path"], intra_op_threads=threads)
        runner.activate()
        name = runner.input_names[0]
        return (lambda x: runner.infer({name: x})), "fp32", runner.deactivate, []
    if kind == "torch":
        import torch

        from mtlora.loading import load_any
        from mtlora.merge import is_merged, merge_model, unmerge_model

        torch.set_num_threads(threads)
        model = load_any(Path(load["checkpoint"]), load.get("img_size")).float().eval()
        if load["merged"] and not is_merged(model):
            merge_model(model)
        elif not load["merged"] and is_merged(model):
            unmerge_model(model)

        def infer(x: np.ndarray):
            with torch.inference_mode():
                return [out.numpy() for out in model(torch.from_numpy(x))]

        return infer, "fp32", lambda: None, [f"torch {torch.__version__}, {torch.get_num_threads()} threads"]
    raise ExportError(f"internal: unknown benchmark target kind '{kind}'")


def _gpu_timer(spec: dict[str, Any]):
    """For a TensorRT engine: (time(batch) -> the trtexec-like GPU timing summary, GPU facts); else (None, {}).

    A second runner of the same plan, so the wall-clock timing above keeps its own buffers."""
    if spec["kind"] != "engine":
        return None, {}
    from export.artifacts.engineset import EngineSet, load_runner

    entry = EngineSet.read(Path(spec["load"]["directory"]))
    if entry.backend != "tensorrt" or entry.layout != "single":  # GPU timing: one TensorRT plan (not yet split sets)
        return None, {}
    runner = load_runner(entry, int(spec["threads"]))
    from engines.tensorrt.runner import cuda_api
    from engines.tensorrt.timing import gpu_facts

    facts = {**cuda_api().device_info(), **gpu_facts()}

    def time(x: np.ndarray) -> dict[str, Any]:
        with runner:
            return runner.time_gpu({"image": x}, iterations=int(spec["runs"]), warmup=int(spec["warmup"]),
                                   cuda_graph=bool(spec.get("cuda_graph"))).summary()

    return time, facts


def time_video(spec: dict[str, Any]) -> dict[str, Any]:
    """A generated clip through the engine end to end (`export.video`): frames per second over the whole run,
    and the time between frames written as the latency rows."""
    from export.artifacts.engineset import open_engine
    from export.video.frames import FrameSource, opencv
    from export.video.pipeline import STAGES, video_to_file

    load = spec["load"]
    cv2 = opencv()
    with tempfile.TemporaryDirectory(prefix="mtlora-bench-video-") as tmp:
        clip = Path(tmp) / "clip.avi"
        write_clip(clip, int(load["frames"]), tuple(load["frame_size"]))
        baseline = _rss_mib()
        with open_engine(load["directory"], threads=int(spec["threads"])) as engine:
            loaded = _rss_mib()
            tasks = engine.tasks
            for _ in range(int(spec["warmup"])):
                engine.infer(np.zeros((1, 3, engine.interface.size, engine.interface.size), np.float32))
            source = FrameSource.video(clip)
            _reset_peak_rss()
            run, _ = video_to_file(engine, source, Path(tmp) / "out.avi", tasks)
            executed = engine.precision_executed
    stats = latency_stats(np.diff([0.0, *run.frame_times]).tolist(), 1)
    stats.update({"images_per_s": run.fps, "peak_rss_mib": _peak_rss_mib(), "peak_rss_scope": "this batch size",
                  "cpu_busy": None, "others_cpu_busy": None, "runs_discarded": 0, "contended": False,
                  "stage_ms_per_frame": {stage: run.ms_per_frame(stage) for stage in STAGES}})
    return {"precision_executed": executed, "notes": [f"opencv {cv2.__version__}"], "rss_before_load_mib": baseline,
            "rss_after_load_mib": loaded, "batches": {"1": stats}}


def write_clip(path: Path, frames: int, size: tuple[int, int]) -> Path:
    """A clip of moving, changing frames (MJPEG), so decoding does real work on every frame."""
    from export.video.frames import opencv

    cv2 = opencv()
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (width, height))
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    background = cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR)
    for i in range(frames):
        frame = np.roll(background, 8 * i, axis=1)
        cv2.circle(frame, ((40 + 12 * i) % width, height // 2), height // 6, (0, 200, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def run_worker_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one target at every batch size (what the worker process does; see the module docstring)."""
    if spec["kind"] == "video":
        return time_video(spec)
    threads = int(spec["threads"])
    baseline = _rss_mib()
    infer, executed, close, notes = _open_target(spec, threads)
    loaded = _rss_mib()
    gpu_time, gpu = _gpu_timer(spec)
    size = int(spec["input_size"])
    results = {}
    try:
        for batch in spec["batch_sizes"]:
            # An image batch, or a batch of the target's own input shape (the MatMul yardstick's matrices).
            shape = spec["load"].get("input_shape") or (3, size, size)
            image = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
            resettable = _reset_peak_rss()
            timings = time_runs(lambda image=image: infer(image), spec["warmup"], spec["runs"], spec["budget_s"],
                                spare_cpus=max(0, available_cpus() - threads))
            clean = [t for t in timings if not t.contended]
            # Too few quiet runs: report them all, flagged, rather than nothing.
            used = clean if len(clean) >= min(MIN_RUNS, spec["runs"]) else timings
            stats = latency_stats([t.seconds for t in used], batch)
            wall = sum(t.seconds for t in used)
            others = [t.others_cpu_s for t in used if t.others_cpu_s is not None]
            stats.update({
                "peak_rss_mib": _peak_rss_mib(),
                "peak_rss_scope": "this batch size" if resettable else "process lifetime",
                "cpu_busy": sum(t.own_cpu_s for t in used) / wall if wall > 0 else None,
                "others_cpu_busy": sum(others) / wall if others and wall > 0 else None,
                "runs_discarded": len(timings) - len(used),
                "contended": used is not clean,
            })
            if gpu_time is not None:
                stats["gpu"] = gpu_time(image)  # as trtexec reports: H2D, GPU compute, D2H from CUDA events
            results[str(batch)] = stats
    finally:
        close()
    return {"precision_executed": executed, "notes": notes, "rss_before_load_mib": baseline,
            "rss_after_load_mib": loaded, "batches": results, **({"gpu": gpu} if gpu else {})}


def _worker_main(argv: Sequence[str]) -> int:
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_worker_spec(spec)
    except Exception as err:  # noqa: BLE001 - any failure becomes this target's row, not the run's end
        result = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    Path(result_path).write_text(json.dumps(result))
    return 0


def run_target(target: Target, opts: BenchOptions, input_size: int) -> dict[str, Any]:
    """Time `target` in a fresh worker process; returns the worker's result (or {"error": ...})."""
    threads = opts.thread_count
    spec = {"kind": target.kind, "load": target.load, "threads": threads, "input_size": input_size,
            "batch_sizes": list(target.batch_sizes or opts.batch_sizes), "warmup": opts.warmup,
            "runs": opts.runs, "budget_s": opts.budget_s, "cuda_graph": opts.cuda_graph}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    with tempfile.TemporaryDirectory(prefix="mtlora-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        try:
            proc = subprocess.run([sys.executable, "-m", "export.bench.worker", "--worker", str(spec_path), str(result_path)],
                                  env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
        if not result_path.is_file():
            lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
            return {"error": f"worker exited with {proc.returncode}: {lines[-1] if lines else 'no output'}"}
        return json.loads(result_path.read_text())


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m export.bench.worker --worker SPEC.json RESULT.json (internal; use 'mtlora-export bench')")
