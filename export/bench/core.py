"""Latency, throughput, memory and achieved FLOP rate of a build's engines, next to PyTorch eager.

Each benchmark target (an engine of the build, a plain ONNX file, or the PyTorch
model unmerged or merged) runs in a fresh worker process, `python -m
export.bench.core --worker SPEC RESULT`, so that one runtime's allocations, thread
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
as a fraction of this machine's fp32 matrix-multiply rate (numpy's BLAS sgemm
on a large square matrix, measured in the benchmarking process at the start
and the end of the run with the same thread count; the better of the two is
the reference). An int8 engine does the same arithmetic in int8, so its
fraction can exceed 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError

BENCH_FORMAT = "mtlora-export/bench/1"
MIN_RUNS = 3  # fewest timed runs per target and batch size, whatever the time budget
CONTENDED_SHARE = 0.1  # a run is discarded when other processes took more than this share of a CPU during it
WORKER_TIMEOUT_S = 3600
MIB = 2**20

Say = Callable[[str], None]

# Row statuses, from the build's report.json.
PASSED, FAILED_ACCURACY, FAILED_BUILD, NOT_CHECKED = (
    "built, passed", "built, failed accuracy", "failed to build", "built, not checked")
REFERENCE, UNCHECKED, FAILED_RUN = "the reference", "not checked", "failed to run"


@dataclass
class BenchOptions:
    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int | None = None  # None: every CPU this process may use
    runs: int = 50  # most timed runs per target and batch size
    warmup: int = 2
    budget_s: float = 10.0  # stop timing once this many seconds have passed (and MIN_RUNS are done)
    torch_eager: bool = True  # also time the PyTorch model, unmerged and merged
    matmul_size: int = 2048
    quiet_wait_s: float = 0.0  # before each format, wait up to this long for other processes to go quiet

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(sorted({int(b) for b in self.batch_sizes}))
        if not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ExportError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.runs < 1 or self.warmup < 0 or self.budget_s < 0:
            raise ExportError("runs must be at least 1, warmup and the time budget at least 0")
        if self.threads is not None and self.threads < 1:
            raise ExportError(f"threads must be at least 1, got {self.threads}")

    @property
    def thread_count(self) -> int:
        return self.threads or available_cpus()


@dataclass
class Target:
    """One row group of the benchmark: what to load, and what the build's report says about it."""

    name: str  # e.g. "openvino-int8", "pytorch-unmerged"
    kind: str  # engine | onnx | torch
    load: dict[str, Any]  # what the worker needs to load it
    backend: str
    precision: str  # requested
    status: str
    size_bytes: int | None = None
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> summary from report.json
    precision_executed: str = ""
    flops_per_image: float | None = None  # None: the model's count
    batch_sizes: tuple[int, ...] | None = None  # None: BenchOptions.batch_sizes
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- FLOPs


def _matmul_macs(a: list[int], b: list[int]) -> int:
    """MACs of numpy-style matmul of shapes a and b (1-D operands promoted as numpy does)."""
    a = [1, *a] if len(a) == 1 else list(a)
    b = [*b, 1] if len(b) == 1 else list(b)
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return int(np.prod(batch, dtype=np.int64)) * a[-2] * a[-1] * b[-1]


def _node_macs(node, shapes: dict[str, list[int] | None]) -> int | None:
    def shape(i: int) -> list[int] | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        s = shapes.get(node.input[i])
        return s if s is not None and all(d is not None for d in s) else None

    if node.op_type == "MatMul":
        a, b = shape(0), shape(1)
        return None if a is None or b is None else _matmul_macs(a, b)
    if node.op_type == "Gemm":
        a, b = shape(0), shape(1)
        if a is None or b is None:
            return None
        attrs = {attr.name: attr.i for attr in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
        n = b[0] if attrs.get("transB") else b[1]
        return m * k * n
    if node.op_type == "Conv":
        weight, out = shape(1), shapes.get(node.output[0])
        if weight is None or out is None or any(d is None for d in out):
            return None
        # Every output element is a dot product over (C_in / group) x kernel.
        return int(np.prod(out, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
    return 0


COUNTED_OPS = ("MatMul", "Gemm", "Conv")


def count_flops(paths: str | os.PathLike | Sequence[str | os.PathLike], batch: int = 1) -> dict[str, Any]:
    """FLOPs of one forward pass at `batch` (2 x MACs of every MatMul, Gemm and Conv), from the ONNX shapes.

    Symbolic input dimensions are set to `batch` and ONNX shape inference (with
    data propagation) fills in the intermediate shapes. Where it cannot (shapes
    computed at run time by Shape/Gather arithmetic, as in a traced timm model),
    the graph is run once with ONNX Runtime at that batch to read the missing
    shapes. Returns {"flops", "by_op": {op: flops}, "uncounted": [nodes whose
    shapes stayed unknown], "shapes_from_run": how many nodes needed the run}.
    Several files (a split layout's backbone and heads) are summed.
    """
    import onnx

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    by_op = dict.fromkeys(COUNTED_OPS, 0)
    by_node: dict[str, int] = {}
    uncounted: list[str] = []
    from_run = 0
    for path in paths:
        model = onnx.load(str(path))
        initializers = {init.name for init in model.graph.initializer}
        for value in model.graph.input:
            if value.name in initializers:
                continue
            for dim in value.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value"):
                    dim.dim_value = batch  # the dims are a oneof: this clears dim_param
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
            raise ExportError(f"{path}: ONNX shape inference failed, cannot count FLOPs: {err}") from None
        shapes = _static_shapes(inferred)
        nodes = [n for n in inferred.graph.node if n.op_type in COUNTED_OPS]
        unknown = [n for n in nodes if _node_macs(n, shapes) is None]
        if unknown:
            wanted = {name for n in unknown for name in (*n.input[:2], n.output[0])
                      if name and (shapes.get(name) is None or None in shapes[name])}
            shapes.update(_shapes_by_running(model, sorted(wanted), batch))
            from_run += len(unknown)
        for node in nodes:
            macs = _node_macs(node, shapes)
            if macs is None:
                uncounted.append(node.name or node.op_type)
            else:
                by_op[node.op_type] += 2 * macs
                by_node[node.name] = by_node.get(node.name, 0) + 2 * macs
    return {"flops": sum(by_op.values()), "by_op": by_op, "by_node": by_node, "uncounted": uncounted, "batch": batch,
            "shapes_from_run": from_run}


def _static_shapes(model) -> dict[str, list[int | None] | None]:
    shapes: dict[str, list[int | None] | None] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor = value.type.tensor_type
        shapes[value.name] = ([d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
                              if tensor.HasField("shape") else None)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _shapes_by_running(model, names: list[str], batch: int) -> dict[str, list[int]]:
    """Shapes of the float tensors `names`, read by running `model` once on zeros with ONNX Runtime."""
    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    initializers = {init.name for init in probe.graph.initializer}
    feed = {}
    for value in probe.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in tensor.shape.dim]
        feed[value.name] = np.zeros(dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
        values = session.run(wanted, feed)
    except Exception:  # noqa: BLE001 - the count then reports these nodes as uncounted
        return {}
    return {name: list(value.shape) for name, value in zip(wanted, values, strict=True)}


# ----------------------------------------------------------------------------- the machine


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                                      "amx_bf16", "amx_int8")) -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {f: f in flags for f in wanted}


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("numpy", "onnx", "onnxruntime", "openvino", "nncf", "torch"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def matmul_rate(size: int = 2048, threads: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """fp32 GFLOP/s of numpy's BLAS on a (size x size) @ (size x size) product: best and median of `repeats`.

    The BLAS thread pool is limited to `threads` (threadpoolctl, when installed),
    and the BLAS library it used is recorded.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    limit = threadpoolctl.threadpool_limits(limits=threads, user_api="blas") if threadpoolctl and threads \
        else contextlib.nullcontext()
    with limit:
        np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            times.append(time.perf_counter() - start)
        blas = [{k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                for info in (threadpoolctl.threadpool_info() if threadpoolctl else []) if info.get("user_api") == "blas"]
    flops = 2.0 * size**3
    return {"size": size, "threads": threads, "gflops": flops / min(times) / 1e9,
            "gflops_median": flops / float(np.median(times)) / 1e9, "repeats": repeats, "blas": blas}


def machine_info(threads: int) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpus_available": available_cpus(), "cpus_total": os.cpu_count(),
            "threads": threads, "flags": cpu_flags(), "platform": platform.platform(),
            "versions": library_versions()}


# ----------------------------------------------------------------------------- timing (in the worker)


def _system_busy_s() -> float | None:
    """CPU seconds this machine's CPUs have spent busy since boot, steal time included (None without /proc)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timing:
    """One timed call: wall seconds, this process's CPU seconds, and other processes' (None if unknown)."""

    seconds: float
    own_cpu_s: float
    others_cpu_s: float | None
    contended: bool


def wait_for_quiet(max_wait_s: float, sample_s: float = 2.0, share: float = 0.25) -> float:
    """Wait until the rest of the machine uses at most `share` of a CPU (or `max_wait_s` passes); returns seconds waited.

    Meant for the benchmarking parent while no worker runs: everything busy then is someone else.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = _system_busy_s()
        time.sleep(sample_s)
        after = _system_busy_s()
        if before is None or after is None or (after - before) / sample_s <= share:
            break
    return time.perf_counter() - start


def timed_call(infer: Callable[[], Any], spare_cpus: float = 0.0) -> Timing:
    """Time one call; it is contended when other processes (or the hypervisor, as steal time) used more
    than `CONTENDED_SHARE` of a CPU beyond the `spare_cpus` this benchmark leaves free."""
    busy0, cpu0, t0 = _system_busy_s(), time.process_time(), time.perf_counter()
    infer()
    seconds, own = time.perf_counter() - t0, time.process_time() - cpu0
    busy1 = _system_busy_s()
    if busy0 is None or busy1 is None:
        return Timing(seconds, own, None, False)
    others = max(0.0, busy1 - busy0 - own)
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    contended = others - spare_cpus * seconds > CONTENDED_SHARE * seconds + 3 * tick
    return Timing(seconds, own, others, contended)


def time_runs(infer: Callable[[], Any], warmup: int, runs: int, budget_s: float,
              spare_cpus: float = 0.0) -> list[Timing]:
    """Every timed call of `infer` after `warmup` untimed ones.

    Calls go on until `runs` uncontended ones are done, or `budget_s` has passed
    with at least `MIN_RUNS` uncontended ones; contended calls are retried until
    twice the budget has passed (and at least `MIN_RUNS` calls are made).
    """
    for _ in range(warmup):
        infer()
    least = min(MIN_RUNS, runs)
    timings: list[Timing] = []
    start = time.perf_counter()
    while True:
        timings.append(timed_call(infer, spare_cpus))
        clean = sum(not t.contended for t in timings)
        elapsed = time.perf_counter() - start
        if clean >= runs or (elapsed >= budget_s and clean >= least) or \
                (elapsed >= 2 * budget_s and len(timings) >= least):
            return timings


def latency_stats(times_s: Sequence[float], batch: int) -> dict[str, Any]:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"runs": len(ms), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "images_per_s": batch * len(ms) / (float(ms.sum()) / 1e3)}


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
        from export.artifacts.engineset import EngineEntry, load_runner

        runner = load_runner(EngineEntry.read(Path(load["directory"])), threads)
        runner.__enter__()
        input_name = "image"
        return ((lambda x: runner.infer({input_name: x})), getattr(runner, "precision_executed", ""),
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


def run_worker_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one target at every batch size (what the worker process does; see the module docstring)."""
    threads = int(spec["threads"])
    baseline = _rss_mib()
    infer, executed, close, notes = _open_target(spec, threads)
    loaded = _rss_mib()
    size = int(spec["input_size"])
    results = {}
    try:
        for batch in spec["batch_sizes"]:
            image = np.random.default_rng(batch).standard_normal((batch, 3, size, size), dtype=np.float32)
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
            results[str(batch)] = stats
    finally:
        close()
    return {"precision_executed": executed, "notes": notes, "rss_before_load_mib": baseline,
            "rss_after_load_mib": loaded, "batches": results}


def _worker_main(argv: Sequence[str]) -> int:
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_worker_spec(spec)
    except Exception as err:  # noqa: BLE001 - any failure becomes this target's row, not the run's end
        result = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    Path(result_path).write_text(json.dumps(result))
    return 0


def profile_graphs(paths: dict[str, str | os.PathLike], threads: int, runs: int = 5,
                   batch: int = 1) -> dict[str, dict[str, Any]]:
    """Where each ONNX graph's time goes on ONNX Runtime's CPU provider: ms by op type and by node.

    Uses ONNX Runtime's own profiler with all graph optimisations on, so op types
    are those of the optimised graph (fused ops included). The graphs run in turn,
    round after round, so a busy spell of the machine hits them alike; after one
    warm-up round each node counts with its fastest of `runs` runs (other
    processes only ever add time). Returns {name: {"ms_per_op_type",
    "nodes_per_op_type", "ms_per_node": {node: [op type, ms]}, "runs"}}.
    """
    import onnxruntime as ort

    from engines.onnxruntime.runner import session_options

    with tempfile.TemporaryDirectory(prefix="mtlora-profile-") as tmp:
        sessions, feeds = {}, {}
        for i, (name, path) in enumerate(paths.items()):
            options = session_options(intra_op_threads=threads)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"profile{i}")
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            meta = sessions[name].get_inputs()[0]
            shape = [batch if not isinstance(d, int) else d for d in meta.shape]
            feeds[name] = {meta.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        for _ in range(runs + 1):
            for name, session in sessions.items():
                time.sleep(0.1)  # the previous session's threads stop spinning first
                session.run(None, feeds[name])
        return {name: _profile_summary(json.loads(Path(session.end_profiling()).read_text()), runs)
                for name, session in sessions.items()}


def _profile_summary(events: list[dict], runs: int) -> dict[str, Any]:
    model_runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after_warmup = model_runs[1] if len(model_runs) > 1 else 0
    durations: dict[str, tuple[str, list[float]]] = {}  # node -> (op type, ms in each timed run)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name", "?")
        _, times = durations.setdefault(event["name"][: -len("_kernel_time")], (op, []))
        if event["ts"] >= after_warmup:
            times.append(event["dur"] / 1e3)
    per_node = {name: [op, min(times) if times else 0.0] for name, (op, times) in durations.items()}
    ms: dict[str, float] = {}
    nodes: dict[str, int] = {}
    for op, fastest in per_node.values():
        ms[op] = ms.get(op, 0.0) + fastest
        nodes[op] = nodes.get(op, 0) + 1
    return {"ms_per_op_type": dict(sorted(ms.items(), key=lambda kv: -kv[1])), "nodes_per_op_type": nodes,
            "ms_per_node": per_node, "runs": runs}


def interleaved_latency(infers: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                        max_rounds: int | None = None, pause_s: float = 0.1) -> dict[str, Any]:
    """Time several callables in turn, round after round, the order rotating each round.

    A busy spell of a shared machine then slows all of them alike, so ratios of
    their medians are steadier than ratios of timings taken minutes apart. A
    round in which any call was contended (see `timed_call`) is dropped; rounds
    go on until `rounds` are kept or `max_rounds` (default 3 x rounds) were run.
    Each call is preceded by a `pause_s` sleep, so that the previous runtime's
    worker threads have stopped spinning and do not compete with the next one.
    Returns {"seconds": {name: [seconds per kept round]}, "rounds_kept", "rounds_dropped", "contended"};
    if no round was quiet, every round is kept and "contended" is true.
    """
    names = list(infers)
    for _ in range(warmup):
        for name in names:
            infers[name]()
    quiet: list[dict[str, float]] = []
    disturbed: list[dict[str, float]] = []
    limit = max_rounds or 3 * rounds
    while len(quiet) < rounds and len(quiet) + len(disturbed) < limit:
        shift = (len(quiet) + len(disturbed)) % len(names)
        timings = {}
        for name in names[shift:] + names[:shift]:
            time.sleep(pause_s)
            timings[name] = timed_call(infers[name])
        (disturbed if any(t.contended for t in timings.values()) else quiet).append(
            {name: t.seconds for name, t in timings.items()})
    kept = quiet or disturbed
    return {"seconds": {name: [r[name] for r in kept] for name in names}, "rounds_kept": len(kept),
            "rounds_dropped": len(disturbed) if quiet else 0, "contended": not quiet}


# ----------------------------------------------------------------------------- targets


def _task_summary(task: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"passed": all(c["passed"] for c in task.get("checks", [])),
                               "cosine": task.get("tensor", {}).get("cosine")}
    if "argmax_agreement" in task:
        summary["agreement"] = task["argmax_agreement"]
    if "angle_deg" in task:
        summary["angle_deg"] = task["angle_deg"]
    metrics = task.get("metrics")
    if metrics:
        name = metrics["primary"]
        summary["metric"] = name
        summary["value"] = metrics["engine"][name]
        summary["reference"] = metrics["reference"][name]
        summary["drop"] = metrics.get("drop")
        summary["higher_is_better"] = metrics.get("higher_is_better")
    return summary


def _engine_size(entry) -> int:
    return sum(p.stat().st_size for artifact in entry.artifacts(verify=False).values() for p in artifact.paths)


def engine_targets(build_dir: Path, report: dict | None, failures: dict[str, str] | None = None) -> list[Target]:
    """One target per engine in the build, with its status and accuracy from report.json."""
    from export.artifacts.engineset import list_engines

    checked = {f"{e['engine']['backend']}-{e['engine']['precision_requested']}": e
               for e in (report or {}).get("engines", [])}
    targets = []
    for entry in list_engines(build_dir):
        engine = checked.get(entry.key)
        status = NOT_CHECKED if engine is None else (PASSED if engine["passed"] else FAILED_ACCURACY)
        accuracy = {t: _task_summary(d) for t, d in (engine or {}).get("tasks", {}).items()}
        executed = (engine or {}).get("engine", {}).get("precision_executed", "")
        targets.append(Target(entry.key, "engine", {"directory": str(entry.directory)}, entry.backend,
                              entry.precision, status, _engine_size(entry), accuracy, executed))
    for key, message in (failures or {}).items():
        backend, _, precision = key.partition("-")
        targets.append(Target(key, "engine", {}, backend, precision, FAILED_BUILD, notes=[message]))
    return targets


def torch_targets(checkpoint: Path, img_size: int | None = None) -> list[Target]:
    """PyTorch eager in fp32, as trained (unmerged) and with the task-agnostic adapters merged."""
    weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    size = weights.stat().st_size if weights.is_file() else None
    return [Target(f"pytorch-{form}", "torch", {"checkpoint": str(checkpoint), "img_size": img_size,
                                                "merged": form == "merged"},
                   "pytorch", "fp32", REFERENCE if form == "unmerged" else UNCHECKED, size,
                   precision_executed="fp32")
            for form in ("unmerged", "merged")]


def onnx_target(name: str, path: Path, status: str = UNCHECKED, count: bool = True) -> Target:
    """A plain fp32 ONNX file on ONNX Runtime's CPU provider, with its own FLOP count."""
    flops = count_flops(path)["flops"] if count else None
    return Target(name, "onnx", {"path": str(path)}, "onnxruntime", "fp32", status, path.stat().st_size,
                  precision_executed="fp32", flops_per_image=flops)


# ----------------------------------------------------------------------------- running


def run_target(target: Target, opts: BenchOptions, input_size: int) -> dict[str, Any]:
    """Time `target` in a fresh worker process; returns the worker's result (or {"error": ...})."""
    threads = opts.thread_count
    spec = {"kind": target.kind, "load": target.load, "threads": threads, "input_size": input_size,
            "batch_sizes": list(target.batch_sizes or opts.batch_sizes), "warmup": opts.warmup,
            "runs": opts.runs, "budget_s": opts.budget_s}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    with tempfile.TemporaryDirectory(prefix="mtlora-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        try:
            proc = subprocess.run([sys.executable, "-m", "export.bench.core", "--worker", str(spec_path), str(result_path)],
                                  env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
        if not result_path.is_file():
            lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
            return {"error": f"worker exited with {proc.returncode}: {lines[-1] if lines else 'no output'}"}
        return json.loads(result_path.read_text())


def _rows(target: Target, result: dict[str, Any], flops: float | None, matmul_gflops: float) -> list[dict]:
    base = {"name": target.name, "kind": target.kind, "backend": target.backend,
            "precision_requested": target.precision,
            "precision_executed": result.get("precision_executed") or target.precision_executed or "",
            "status": target.status, "size_mib": None if target.size_bytes is None else target.size_bytes / MIB,
            "accuracy": target.accuracy, "notes": list(target.notes) + list(result.get("notes", [])),
            "waited_for_quiet_s": result.get("waited_for_quiet_s")}
    if target.status == FAILED_BUILD:
        return [{**base, "batch_size": None}]
    if "error" in result:
        return [{**base, "status": f"{target.status}; {FAILED_RUN}", "batch_size": None,
                 "notes": base["notes"] + [result["error"]]}]
    rows = []
    for batch, stats in result["batches"].items():
        row = {**base, "batch_size": int(batch), **stats,
               "rss_after_load_mib": result.get("rss_after_load_mib"), "flops_per_image": flops}
        if flops:
            row["achieved_gflops"] = flops * stats["images_per_s"] / 1e9
            row["fraction_of_matmul"] = row["achieved_gflops"] / matmul_gflops
        rows.append(row)
    return rows


def _time_target(target: Target, opts: BenchOptions, input_size: int, say: Say) -> dict[str, Any]:
    batches = ",".join(str(b) for b in target.batch_sizes or opts.batch_sizes)
    waited = wait_for_quiet(opts.quiet_wait_s) if opts.quiet_wait_s > 0 else 0.0
    say(f"[bench] {target.name}: batch {batches}" + (f" (waited {waited:.0f} s for a quiet machine)"
                                                     if waited >= 5 else ""))
    started = time.perf_counter()
    result = run_target(target, opts, input_size)
    result["waited_for_quiet_s"] = waited
    if "error" in result:
        say(f"[bench] {target.name}: {result['error']}")
    else:
        summary = ", ".join(f"b{b} p50 {s['p50_ms']:.1f} ms ({s['runs']} runs{', contended' if s['contended'] else ''})"
                            for b, s in result["batches"].items())
        say(f"[bench] {target.name}: {summary} [{time.perf_counter() - started:.0f} s]")
    return result


def benchmark(targets: Sequence[Target], opts: BenchOptions, *, input_size: int, model_flops: dict[str, Any],
              say: Say, model: dict[str, Any] | None = None, command: str | None = None) -> dict[str, Any]:
    """Time every target (each in its own worker) and return the benchmark result (see `write_json`)."""
    threads = opts.thread_count
    machine = machine_info(threads)
    load_start = load_average()
    say(f"[bench] fp32 matmul rate ({opts.matmul_size}^2, {threads} thread(s))")
    matmul_start = matmul_rate(opts.matmul_size, threads)
    say(f"[bench] {matmul_start['gflops']:.1f} GFLOP/s")
    results = []
    for target in targets:
        if target.status == FAILED_BUILD:
            results.append((target, {}))
            continue
        results.append((target, _time_target(target, opts, input_size, say)))
    # A format that other processes disturbed throughout gets one more chance at the end.
    for i, (target, result) in enumerate(results):
        contended = [b for b, stats in result.get("batches", {}).items() if stats.get("contended")]
        if not contended:
            continue
        say(f"[bench] {target.name}: batch {','.join(contended)} was contended; timing it again")
        again = _time_target(replace(target, batch_sizes=tuple(int(b) for b in contended)), opts, input_size, say)
        for batch, stats in again.get("batches", {}).items():
            before = result["batches"][batch]
            if not stats["contended"] or stats["p50_ms"] < before["p50_ms"]:
                result["batches"][batch] = {**stats, "retimed": True}
        results[i] = (target, result)
    matmul_end = matmul_rate(opts.matmul_size, threads)
    reference_gflops = max(matmul_start["gflops"], matmul_end["gflops"])
    rows = []
    for target, result in results:
        flops = target.flops_per_image if target.flops_per_image is not None else model_flops.get("flops")
        rows.extend(_rows(target, result, flops, reference_gflops))
    machine.update({"matmul": {"start": matmul_start, "end": matmul_end, "reference_gflops": reference_gflops},
                    "load_average": {"start": load_start, "end": load_average()}})
    return {
        "format": BENCH_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command or shlex.join(["mtlora-export", *sys.argv[1:]]),
        "model": {**(model or {}), "input_size": input_size, "flops_per_image": model_flops.get("flops"),
                  "flops_by_op": model_flops.get("by_op"), "flops_uncounted_nodes": model_flops.get("uncounted", [])},
        "machine": machine,
        "settings": {**asdict(replace(opts, threads=threads)), "min_runs": MIN_RUNS},
        "rows": rows,
    }


# ----------------------------------------------------------------------------- builds


def is_build_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "build.json").is_file() or (path / "engines").is_dir())


def build_for_bench(checkpoint: Path, out: Path, say: Say, *, backends: Sequence[str] = ("all",),
                    precisions: Sequence[str] = ("all",), **build_options) -> tuple[dict, dict[str, str]]:
    """Build every requested engine of `checkpoint` into `out`; returns (report, {engine: why it failed to build}).

    One engine that fails to build stops a build, so after a failure each engine is
    built on its own (the export and finished engines are reused) to find which ones fail.
    """
    from engines.errors import EngineError
    from export.pipeline.build import ALL_PRECISIONS, BuildOptions, resolve_backends, run_build
    from mtlora.errors import MTLoRAError

    opts = BuildOptions(checkpoint=str(checkpoint), backends=tuple(backends), precisions=tuple(precisions),
                        out=str(out), **build_options)
    try:
        return run_build(opts, say).report, {}
    except (MTLoRAError, EngineError) as err:
        say(f"[bench] the build failed ({err}); building engine by engine to see which fail")
    engines, failures, model = [], {}, {}
    wanted = ALL_PRECISIONS if "all" in precisions else tuple(precisions)
    for backend in resolve_backends(tuple(backends), say):
        for precision in wanted:
            try:
                outcome = run_build(replace(opts, backends=(backend,), precisions=(precision,)), say)
            except (MTLoRAError, EngineError) as err:
                failures[f"{backend}-{precision}"] = str(err).splitlines()[0]
                continue
            engines.extend(outcome.report["engines"])
            model = outcome.report["model"]
    if not engines:
        raise ExportError(f"no engine of {checkpoint} could be built: "
                          + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    from export.checking.report import build_report

    return build_report(engines, model), failures


def bench_build(build_dir: str | os.PathLike, opts: BenchOptions, say: Say, *, report: dict | None = None,
                failures: dict[str, str] | None = None, extra_targets: Sequence[Target] = (),
                command: str | None = None) -> dict[str, Any]:
    """Benchmark every engine of `build_dir` and, with `opts.torch_eager`, the PyTorch model it came from."""
    from export.checking.report import read_report
    from export.pipeline.build import EXPORT_DIR, ModelInfo

    build_dir = Path(build_dir)
    if not is_build_dir(build_dir):
        raise ExportError(f"{build_dir}: not a build directory (no engines/); give a build directory or a checkpoint")
    if report is None:
        report = read_report(build_dir) if (build_dir / "report.json").is_file() else None
    export_dir = build_dir / EXPORT_DIR
    info = ModelInfo.from_manifest(export_dir)
    say(f"[bench] counting FLOPs of {', '.join(info.graph_files.values())}")
    model_flops = count_flops([export_dir / f for f in info.graph_files.values()])
    targets: list[Target] = []
    notes = []
    if opts.torch_eager:
        options = _build_options(build_dir)
        checkpoint = _build_checkpoint(options)
        if checkpoint is None:
            notes.append("PyTorch eager not timed: the build does not name a checkpoint that exists here")
        else:
            targets += torch_targets(checkpoint, options.get("img_size"))
    targets += engine_targets(build_dir, report, failures)
    targets += list(extra_targets)
    model = {"build_dir": str(build_dir), "tasks": list(info.tasks), "layout": info.layout,
             "source": (report or {}).get("model", {}).get("source"), "notes": notes}
    return benchmark(targets, opts, input_size=info.size, model_flops=model_flops, say=say, model=model,
                     command=command)


def _build_options(build_dir: Path) -> dict:
    """The options build.json records; {} when it is missing or unreadable (only PyTorch eager needs them)."""
    from export.pipeline.build import read_build_record

    try:
        return read_build_record(build_dir)["options"]
    except ExportError:
        return {}


def _build_checkpoint(options: dict) -> Path | None:
    """The checkpoint a build was made from, if it exists here (a bundle build has none)."""
    if options.get("from_bundle"):
        return None
    if options.get("checkpoint"):
        path = Path(options["checkpoint"])
        return path if path.exists() else None
    from export.pipeline.sources import DEFAULT_MODEL

    return DEFAULT_MODEL if (DEFAULT_MODEL / "model.safetensors").is_file() else None


# ----------------------------------------------------------------------------- output


def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    from engines.files import write_atomic

    return write_atomic(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def _num(value, fmt: str = ".1f") -> str:
    return "" if value is None else format(value, fmt)


PERF_HEADER = ["format", "precision", "status", "size MiB", "batch", "min ms", "p50 ms", "p90 ms", "p99 ms", "runs",
               "img/s", "GFLOP/s", "of matmul", "peak RSS MiB", "cpu busy"]


def runs_cell(row: dict[str, Any]) -> str:
    """Runs kept, '+N' discarded as contended; '!' when too few quiet runs and the contended ones were kept."""
    if row.get("runs") is None:
        return ""
    text = str(row["runs"])
    if row.get("contended"):
        return text + "!"
    return text + (f" (+{row['runs_discarded']})" if row.get("runs_discarded") else "")


def perf_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for row in result["rows"]:
        executed = row["precision_executed"]
        precision = row["precision_requested"] if executed in ("", row["precision_requested"]) else \
            f"{row['precision_requested']} (ran {executed})"
        out.append([row["name"], precision, row["status"], _num(row["size_mib"]), _num(row["batch_size"], "d"),
                    _num(row.get("min_ms")), _num(row.get("p50_ms")), _num(row.get("p90_ms")), _num(row.get("p99_ms")),
                    runs_cell(row), _num(row.get("images_per_s"), ".2f"),
                    _num(row.get("achieved_gflops")), _num(row.get("fraction_of_matmul"), ".0%"),
                    _num(row.get("peak_rss_mib"), ".0f"), _num(row.get("cpu_busy"), ".2f")])
    return out


def _accuracy_cell(summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    parts = []
    if "metric" in summary:
        drop = summary.get("drop")
        parts.append(f"{summary['metric']} {summary['value']:.2f}" + ("" if drop is None else f" (drop {drop:+.3f})"))
    if "agreement" in summary:
        parts.append(f"agree {summary['agreement']:.4f}")
    elif "angle_deg" in summary and "metric" not in summary:
        parts.append(f"angle {summary['angle_deg']:.3f} deg")
    if not parts and summary.get("cosine") is not None:
        parts.append(f"cos {summary['cosine']:.5f}")
    return ", ".join(parts) + ("" if summary.get("passed", True) else " FAIL")


def accuracy_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    tasks = list(result["model"].get("tasks") or [])
    seen, rows = set(), []
    for row in result["rows"]:
        if row["name"] in seen:
            continue
        seen.add(row["name"])
        rows.append([row["name"], row["status"], *(_accuracy_cell(row["accuracy"].get(t, {})) for t in tasks)])
    return ["format", "status", *tasks], rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_lines(result: dict[str, Any]) -> list[str]:
    machine = result["machine"]
    matmul = machine["matmul"]
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('num_threads')} threads, "
                     f"{b.get('architecture')})" for b in matmul["start"].get("blas") or []) or "unknown BLAS"
    flags = ", ".join(f for f, on in machine.get("flags", {}).items() if on)
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    load = machine.get("load_average", {})
    return [
        f"CPU: {machine['cpu']}, {machine['cpus_available']} CPU(s) available ({flags})",
        f"threads per engine: {machine['threads']}",
        f"fp32 matmul ({matmul['start']['size']}^2, numpy with {blas}): "
        f"{matmul['start']['gflops']:.1f} GFLOP/s at the start, {matmul['end']['gflops']:.1f} at the end",
        f"load average (1/5/15 min) at start {load.get('start')}, at end {load.get('end')}",
        f"versions: {versions}",
    ]


def format_table(result: dict[str, Any]) -> str:
    flops = result["model"].get("flops_per_image")
    header, rows = accuracy_rows(result)
    lines = [*machine_lines(result),
             f"model FLOPs per image (MatMul/Gemm/Conv, fp32 graph): {_num(flops and flops / 1e9, '.2f')} G",
             "", _text_table(PERF_HEADER, perf_rows(result)), "", _text_table(header, rows)]
    lines += [f"note {name}: {note}" for name, note in _notes(result)]
    return "\n".join(lines)


def _notes(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(format, note) pairs, once each: a format's notes repeat on each of its batch-size rows."""
    return list(dict.fromkeys((row["name"], note) for row in result["rows"] for note in row.get("notes", [])))


def format_markdown(result: dict[str, Any]) -> str:
    flops = result["model"].get("flops_per_image")
    settings = result["settings"]
    header, rows = accuracy_rows(result)
    lines = [
        "# Benchmark", "",
        f"Command: `{result['command']}`  ", f"Date: {result['created']}", "",
        *(f"- {line}" for line in machine_lines(result)),
        f"- model FLOPs per image (2 x MACs of MatMul/Gemm/Conv in the fp32 graph): {_num(flops and flops / 1e9, '.2f')} G",
        f"- timing: {settings['warmup']} warm-up run(s), then runs until {settings['budget_s']:g} s "
        f"(at least {settings['min_runs']}, at most {settings['runs']}); batch sizes {settings['batch_sizes']}",
        "", md_table(PERF_HEADER, perf_rows(result)), "", md_table(header, rows), "",
        MEASUREMENT_NOTES,
    ]
    notes = _notes(result)
    if notes:
        lines += ["", *(f"- {name}: {note}" for name, note in notes)]
    return "\n".join(lines) + "\n"


MEASUREMENT_NOTES = (
    "Each format is timed in its own fresh worker process. Latency is one `infer` call, numpy in and numpy out; "
    "img/s is batch x runs / timed seconds; GFLOP/s is the model's FLOPs (counted once from the fp32 ONNX "
    "graph) x img/s, and \"of matmul\" divides it by this machine's fp32 sgemm rate. Peak RSS is the worker "
    "process's resident-set high-water mark (VmHWM), reset after loading and before each batch size: it "
    "includes the interpreter, the runtime and the loaded model. A run during which other processes (or the "
    "hypervisor) took more than a tenth of a CPU is discarded and retried a few times: \"runs\" counts the kept "
    "runs, (+N) the discarded ones, and ! marks a row that never got 3 quiet runs and keeps the contended ones. "
    "\"cpu busy\" is the worker's CPU seconds per wall second over the kept runs (at most the thread count)."
)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m export.bench.core --worker SPEC.json RESULT.json (internal; use 'mtlora-export bench')")
