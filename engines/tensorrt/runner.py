"""TensorRT runner (TensorRT 10 and 11): Polygraphy's TrtRunner when installed (and new enough for
this TensorRT), else a thin name-based runner on cuda-python (pycuda as the last resort).

An engine plan only runs on the TensorRT version and GPU compute capability it was built for, so
`load` compares the sidecar with this machine and refuses a mismatch before deserializing anything.

The CUDA facts an engine records (`device_info`), and what each one is:

- ``cuda_driver_version``: the newest CUDA version the installed NVIDIA driver supports
  (cudaDriverGetVersion / cuDriverGetVersion), e.g. "12.6" on JetPack 6.2.
- ``cuda_bindings_runtime_version``: the CUDA runtime the Python CUDA bindings carry (cuda-python
  links its own static runtime; pycuda reports the CUDA it was compiled with). It is *not*
  TensorRT's CUDA, which the Python API does not report.
- ``cuda_bindings``: which bindings and their version ("cuda-python 12.9.2", "pycuda 2025.1").

CUDA errors that mean "no usable GPU here" (no device, a driver older than the bindings need, a stub
driver...) are `BackendUnavailable`, so ``auto`` moves on to the next backend and says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from engines.artifact import EngineArtifact, TensorMeta
from engines.errors import BackendUnavailable, EngineError
from engines.runner import Runner


def _trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "tensorrt is not installed; install NVIDIA's tensorrt wheel (or use JetPack's) on a CUDA machine"
        ) from exc
    except Exception as exc:  # libnvinfer missing or mismatched
        raise BackendUnavailable(f"tensorrt failed to import ({type(exc).__name__}: {exc})") from exc
    return tensorrt


def _polygraphy_trt():
    """polygraphy.backend.trt, or None when Polygraphy is not installed."""
    try:
        from polygraphy.backend import trt as poly_trt
    except ImportError:
        return None
    return poly_trt


def _polygraphy_version() -> str:
    try:
        import polygraphy
    except ImportError:
        return ""
    return str(getattr(polygraphy, "__version__", ""))


# What a TensorRT may lack, and the Polygraphy required without it. Polygraphy 0.49.0's network loader
# sets NetworkDefinitionCreationFlag.EXPLICIT_BATCH unconditionally, and TensorRT 11 removed the flag
# (0.49.9 to 0.50.3 already set it only below TensorRT 10). 0.53.x is the line released alongside
# TensorRT 11 -- NVIDIA/TensorRT 11.3 moved its tools to 0.53.6 -- so 0.53.4 is what is required.
POLYGRAPHY_NEEDS = (
    ("explicit_batch_flag", "0.53.4", "TensorRT 11 has no NetworkDefinitionCreationFlag.EXPLICIT_BATCH"),
)


def polygraphy_problem(poly_version: str, features: Mapping[str, Any]) -> str:
    """Why this Polygraphy must not drive this TensorRT ('' when it may); pure, so testable anywhere."""
    for feature, minimum, why in POLYGRAPHY_NEEDS:
        if not features.get(feature, True) and version_tuple(poly_version) < version_tuple(minimum):
            return f"Polygraphy {poly_version or '(unknown version)'} is older than {minimum} ({why})"
    return ""


def version_tuple(version: str) -> tuple[int, ...]:
    """(0, 53, 4) for '0.53.4', (10, 13, 3, 9) for '10.13.3.9'; non-numeric tails are ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:4])


def trt_features(trt) -> dict[str, Any]:
    """What this TensorRT offers, by feature detection (never by version number).

    Strong typing is there when the STRONGLY_TYPED creation flag is, and also when weak typing is
    gone (no FP16 and no INT8 builder flag): TensorRT 11.4 marks the flag deprecated ("always
    enabled, ignored"), and the release that removes it, as EXPLICIT_BATCH was removed, builds every
    network strongly typed. `strongly_typed_flag` says whether the flag exists to be set.
    """
    fp16_flag, int8_flag = hasattr(trt.BuilderFlag, "FP16"), hasattr(trt.BuilderFlag, "INT8")
    strongly_typed_flag = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    return {
        "version": trt.__version__,
        "strongly_typed": strongly_typed_flag or not (fp16_flag or int8_flag),
        "strongly_typed_flag": strongly_typed_flag,
        "explicit_batch_flag": hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"),
        "fp16_flag": fp16_flag,
        "int8_flag": int8_flag,
        "tf32_flag": hasattr(trt.BuilderFlag, "TF32"),
    }


def usable_polygraphy(trt, prefer_polygraphy: bool = True):
    """(polygraphy.backend.trt or None, note): None when not installed, not wanted or too old for `trt`."""
    poly = _polygraphy_trt() if prefer_polygraphy else None
    if poly is None:
        return None, ""
    problem = polygraphy_problem(_polygraphy_version(), trt_features(trt))
    if problem:
        return None, f"{problem}; used the TensorRT API directly (pip install 'polygraphy>=0.53.4' to use Polygraphy)"
    return poly, ""


@cache
def trt_logger(trt):
    """One logger per process, with TensorRT's own plugins registered (as Polygraphy does) before any
    engine is parsed or deserialized: a plan that uses a plugin layer cannot be loaded otherwise."""
    logger = trt.Logger(trt.Logger.WARNING)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    return logger


# ----------------------------------------------------------------------------- CUDA access


# cudaError_t values that mean "no usable GPU on this machine", not "this call went wrong": they make
# the backend unavailable, so 'auto' picks the next one and prints the reason.
UNUSABLE_CUDA_ERRORS: dict[int, str] = {
    3: "CUDA failed to initialise",
    34: "the CUDA driver found is a stub library, not a real driver",
    35: "the NVIDIA driver is older than these CUDA bindings need",
    36: "the NVIDIA driver is older than this CUDA call needs",
    46: "every CUDA device is busy or unavailable",
    100: "no CUDA-capable GPU is present",
    803: "the NVIDIA kernel driver and its user-mode library have different versions",
    804: "this GPU does not support the installed forward-compatibility driver",
}
DRIVER_HINT = (
    "cuda-python must match the driver's CUDA major: 12.x for CUDA 12 (JetPack 6, drivers < 580), "
    "13.x for CUDA 13 (JetPack 7, drivers >= 580); see README 'Deploying on Jetson'"
)


def cuda_error(code: int, name: str, message: str, what: str, detail: str = "") -> EngineError:
    """The exception for a failed CUDA call: BackendUnavailable for the UNUSABLE_CUDA_ERRORS, else EngineError.
    `detail` (e.g. which CUDA the driver and the bindings have) is added to the reason."""
    if code in UNUSABLE_CUDA_ERRORS:
        reason = f"{UNUSABLE_CUDA_ERRORS[code]}{f' ({detail})' if detail else ''}"
        hint = f"; {DRIVER_HINT}" if code in (35, 36) else ""
        return BackendUnavailable(f"{reason} ({what}: {name} {code}: {message}){hint}")
    return EngineError(f"CUDA {what} failed: {name} {code}: {message}")


def format_cuda_version(version) -> str:
    """'12.6' for CUDA's encoded 12060, for pycuda's (12, 6, 0) and for '12.6.85'; one format for both bindings."""
    if isinstance(version, int):
        return f"{version // 1000}.{(version % 1000) // 10}"
    parts = list(version) if isinstance(version, (tuple, list)) else str(version).split(".")
    return ".".join(str(int(p)) for p in parts[:2])


class _CudaPython:
    """The few CUDA runtime calls we need, through cuda-python (cuda.bindings or the older cuda.cudart)."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6; ImportError here means no cuda-python at all
        self.cudart = cudart

    def _check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            _, message = self.cudart.cudaGetErrorString(err)
            message = message.decode() if isinstance(message, bytes) else str(message)
            detail = self._versions() if int(err) in (35, 36) else ""
            raise cuda_error(int(err), getattr(err, "name", "cudaError"), message, what, detail)
        return rest[0] if len(rest) == 1 else rest

    def _versions(self) -> str:
        """What the driver and the bindings have, for the 'driver too old' errors (0: no driver loaded)."""
        driver_err, driver = self.cudart.cudaDriverGetVersion()
        runtime_err, runtime = self.cudart.cudaRuntimeGetVersion()
        if driver_err != self.cudart.cudaError_t.cudaSuccess or runtime_err != self.cudart.cudaError_t.cudaSuccess:
            return ""
        have = "no NVIDIA driver is loaded" if driver == 0 else f"the driver supports CUDA {format_cuda_version(driver)}"
        return f"{have}; {_distribution('cuda-python', 'cuda-bindings')} needs CUDA {format_cuda_version(runtime)}"

    def device_info(self, device: int = 0) -> dict[str, str]:
        count = self._check(self.cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if count <= device:
            raise BackendUnavailable(f"no CUDA GPU {device} here ({count} found)")
        props = self._check(self.cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        runtime = self._check(self.cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
        driver = self._check(self.cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
        return {
            "gpu_name": name,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda_driver_version": format_cuda_version(driver),
            "cuda_bindings_runtime_version": format_cuda_version(runtime),
            "cuda_bindings": _distribution("cuda-python", "cuda-bindings"),
        }

    def stream(self):
        return self._check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream) -> int:
        return int(stream)

    def synchronize(self, stream) -> None:
        self._check(self.cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy_stream(self, stream) -> None:
        self._check(self.cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._check(self.cudart.cudaFree(ptr), "cudaFree")

    def to_device(self, ptr: int, array: np.ndarray, stream) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync")

    def to_host(self, array: np.ndarray, ptr: int, stream) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream), "cudaMemcpyAsync")

    # timing (engines.tensorrt.timing) ------------------------------------------------------
    def event(self):
        return self._check(self.cudart.cudaEventCreate(), "cudaEventCreate")

    def record(self, event, stream) -> None:
        self._check(self.cudart.cudaEventRecord(event, stream), "cudaEventRecord")

    def event_synchronize(self, event) -> None:
        self._check(self.cudart.cudaEventSynchronize(event), "cudaEventSynchronize")

    def elapsed_ms(self, start, end) -> float:
        return float(self._check(self.cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def destroy_event(self, event) -> None:
        self._check(self.cudart.cudaEventDestroy(event), "cudaEventDestroy")

    def pinned_empty(self, shape: tuple, dtype: np.dtype) -> tuple[int, np.ndarray]:
        """(pointer, array) of page-locked host memory: copies from it are true async DMA transfers."""
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
        ptr = int(self._check(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        count = int(np.prod(shape, dtype=np.int64))
        return ptr, np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def free_pinned(self, ptr: int) -> None:
        self._check(self.cudart.cudaFreeHost(ptr), "cudaFreeHost")

    def capture_graph(self, stream, enqueue):
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        finally:
            graph = self._check(self.cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            executable = self._check(self.cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except BaseException:
            self.cudart.cudaGraphDestroy(graph)
            raise
        return graph, executable

    def graph_launch(self, graph, stream) -> None:
        self._check(self.cudart.cudaGraphLaunch(graph[1], stream), "cudaGraphLaunch")

    def destroy_graph(self, graph) -> None:
        self._check(self.cudart.cudaGraphExecDestroy(graph[1]), "cudaGraphExecDestroy")
        self._check(self.cudart.cudaGraphDestroy(graph[0]), "cudaGraphDestroy")


class _PyCuda:
    """Fallback for machines with pycuda and no cuda-python.

    It works in the device's primary context, the one the CUDA runtime (and so TensorRT) uses, and
    makes it current only around each call: pycuda aborts the interpreter at exit when a context it
    pushed is still on the stack, so every push here is popped before the call returns.
    """

    def __init__(self):
        import pycuda.driver as cuda

        try:
            cuda.init()
            self._primary = cuda.Device(0).retain_primary_context()
        except cuda.Error as exc:
            raise BackendUnavailable(f"pycuda found no usable GPU ({exc}); {DRIVER_HINT}") from exc
        self.cuda = cuda
        self._allocations: dict[int, Any] = {}

    @contextlib.contextmanager
    def _current(self):
        self._primary.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def device_info(self, device: int = 0) -> dict[str, str]:
        dev = self.cuda.Device(device)
        major, minor = dev.compute_capability()
        return {
            "gpu_name": dev.name(),
            "compute_capability": f"{major}.{minor}",
            "cuda_driver_version": format_cuda_version(self.cuda.get_driver_version()),
            "cuda_bindings_runtime_version": format_cuda_version(self.cuda.get_version()),
            "cuda_bindings": _distribution("pycuda"),
        }

    def stream(self):
        with self._current():
            return self.cuda.Stream()

    def stream_handle(self, stream) -> int:
        return stream.handle

    def synchronize(self, stream) -> None:
        with self._current():
            stream.synchronize()

    def destroy_stream(self, stream) -> None:
        pass  # pycuda frees a Stream when it is garbage-collected

    def malloc(self, nbytes: int) -> int:
        with self._current():
            allocation = self.cuda.mem_alloc(max(nbytes, 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        with self._current():
            self._allocations.pop(ptr).free()

    def to_device(self, ptr: int, array: np.ndarray, stream) -> None:
        with self._current():
            self.cuda.memcpy_htod_async(ptr, array, stream)

    def to_host(self, array: np.ndarray, ptr: int, stream) -> None:
        with self._current():
            self.cuda.memcpy_dtoh_async(array, ptr, stream)

    # timing (engines.tensorrt.timing) ------------------------------------------------------
    def event(self):
        with self._current():
            return self.cuda.Event()

    def record(self, event, stream) -> None:
        with self._current():
            event.record(stream)

    def event_synchronize(self, event) -> None:
        with self._current():
            event.synchronize()

    def elapsed_ms(self, start, end) -> float:
        with self._current():
            return float(start.time_till(end))

    def destroy_event(self, event) -> None:
        pass  # pycuda frees an Event when it is garbage-collected

    def pinned_empty(self, shape: tuple, dtype: np.dtype) -> tuple[int, np.ndarray]:
        with self._current():
            array = self.cuda.pagelocked_empty(shape, dtype)
        self._allocations[array.ctypes.data] = array
        return array.ctypes.data, array

    def free_pinned(self, ptr: int) -> None:
        self._allocations.pop(ptr, None)

    def capture_graph(self, stream, enqueue):
        raise EngineError("pycuda cannot capture CUDA graphs here; install cuda-python for --cuda-graph")

    def graph_launch(self, graph, stream) -> None:
        raise EngineError("pycuda cannot launch CUDA graphs")

    def destroy_graph(self, graph) -> None:
        pass


@cache
def cuda_api():
    """cuda-python if installed, else pycuda; BackendUnavailable when neither is, or when CUDA has no
    usable GPU. One per process: pycuda's retains the primary context once."""
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _PyCuda()
    except ImportError:
        raise BackendUnavailable(
            "neither cuda-python nor pycuda is installed; install the wheel with the extra for the driver's "
            "CUDA major, [tensorrt-cu12] or [tensorrt-cu13] (README 'Deploying on Jetson')"
        ) from None


def _distribution(*names: str) -> str:
    """'cuda-python 12.9.2': the first of `names` that is installed, with its version."""
    from importlib import metadata

    for name in names:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return f"{names[0]} (version unknown)"


def current_environment() -> dict[str, str]:
    """TensorRT version and GPU facts of this machine (what an engine's sidecar must match)."""
    trt = _trt()
    return {"tensorrt_version": trt.__version__, **cuda_api().device_info()}


def check_engine_compatible(built: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Why an engine built in environment `built` cannot run `here` (empty list: it can).

    A plan is tied to the exact TensorRT version and to the GPU's compute capability; a different
    GPU model of the same capability runs it (possibly slower), so that is not a refusal.
    """
    problems = []
    if built.get("tensorrt_version") != here.get("tensorrt_version"):
        problems.append(f"built with TensorRT {built.get('tensorrt_version')}, this machine has {here.get('tensorrt_version')}")
    if built.get("compute_capability") != here.get("compute_capability"):
        problems.append(
            f"built for compute capability {built.get('compute_capability')} ({built.get('gpu_name')}), "
            f"this GPU is {here.get('compute_capability')} ({here.get('gpu_name')})"
        )
    return problems


# ----------------------------------------------------------------------------- batch range


def batch_problem(name: str, shape, batch_range: tuple[int, int, int] | None) -> str:
    """Why an input of `shape` is outside the engine's optimisation profile ('' when it is inside).

    `batch_range` is (min, opt, max) of the batch dimension the plan was built for; TensorRT
    refuses any other batch, and only says so through set_input_shape's return value.
    """
    if batch_range is None or not len(shape):
        return ""
    low, opt, high = batch_range
    if low <= shape[0] <= high:
        return ""
    return (
        f"input '{name}' has batch {shape[0]}, but this engine was built for batch {low} to {high} (opt {opt}); "
        f"run it in batches of at most {high}, or rebuild it with max_batch={shape[0]} (mtlora-export build --max-batch)"
    )


def profile_batch_ranges(engine, input_names) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) batch of each dynamic-batch input in the engine's first optimisation profile."""
    ranges = {}
    for name in input_names:
        if engine.get_tensor_shape(name)[0] >= 0:
            continue  # a fixed batch: the shape check of Runner.check_feed covers it
        low, opt, high = engine.get_tensor_profile_shape(name, 0)
        ranges[name] = (int(low[0]), int(opt[0]), int(high[0]))
    return ranges


# ----------------------------------------------------------------------------- runners


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT plan (TensorRT 10/11 name-based I/O API)."""

    def __init__(self, plan_path: str | os.PathLike, *, name: str | None = None, prefer_polygraphy: bool = True):
        super().__init__(name or f"tensorrt:{Path(plan_path).name}")
        self.plan_path = Path(plan_path)
        self.prefer_polygraphy = prefer_polygraphy
        self.batch_ranges: dict[str, tuple[int, int, int]] = {}
        self._poly_runner = None
        self._engine = None
        self._context = None
        self._cuda = None
        self._stream = None
        self._buffers: dict[str, tuple[int, int]] = {}

    def _activate(self) -> None:
        trt = _trt()
        # No usable GPU is BackendUnavailable here, whichever way the runner was made (`load` or
        # directly), before Polygraphy could raise its own exception for it.
        self._cuda = cuda_api()
        self._cuda.device_info()
        plan = self.plan_path.read_bytes()
        try:
            self._open(trt, plan)
        except BaseException:
            self._deactivate()  # an engine, context or stream made before the error is freed
            raise

    def _open(self, trt, plan: bytes) -> None:
        poly, note = usable_polygraphy(trt, self.prefer_polygraphy)
        if note:
            self.notes.append(note)
        if poly is not None:
            self._poly_runner = poly.TrtRunner(poly.EngineFromBytes(plan))
            self._poly_runner.activate()
            quiet_nvtx(trt, self._poly_runner.context)
            engine = self._poly_runner.context.engine
        else:
            runtime = trt.Runtime(trt_logger(trt))
            self._engine = runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise EngineError(f"TensorRT could not deserialize {self.plan_path.name}; rebuild it on this machine")
            self._stream = self._cuda.stream()
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise EngineError(f"TensorRT could not create an execution context for {self.plan_path.name} "
                                  "(out of GPU memory?); see the TensorRT log")
            quiet_nvtx(trt, self._context)
            engine = self._engine
        self.inputs, self.outputs = engine_io(trt, engine)
        self.batch_ranges = profile_batch_ranges(engine, [m.name for m in self.inputs])

    def _deactivate(self) -> None:
        """Free what `_activate` made, in reverse order; safe on a half-made runner."""
        try:
            if self._poly_runner is not None:
                runner, self._poly_runner = self._poly_runner, None
                if getattr(runner, "is_active", True):
                    runner.deactivate()
            for ptr, _ in self._buffers.values():
                self._cuda.free(ptr)
            self._buffers.clear()
            self._context = None  # the context before its engine: TensorRT frees them in that order
            self._engine = None
            if self._stream is not None:
                stream, self._stream = self._stream, None
                self._cuda.destroy_stream(stream)
        finally:
            self._context = self._engine = self._stream = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in feed.items():
            problem = batch_problem(name, array.shape, self.batch_ranges.get(name))
            if problem:
                raise EngineError(f"{self.name}: {problem}")
        if self._poly_runner is not None:
            outputs = self._poly_runner.infer(feed)
            # Polygraphy hands out views of buffers it reuses on the next call.
            return {meta.name: np.array(outputs[meta.name], copy=True) for meta in self.outputs}
        trt = _trt()
        for name, array in feed.items():
            # False means the shape is outside the optimisation profile; TensorRT's next error would
            # be about something else, so say it here.
            if not self._context.set_input_shape(name, array.shape):
                raise EngineError(
                    f"{self.name}: TensorRT refused input '{name}' of shape {tuple(array.shape)}; "
                    f"the engine's profile allows batch {self.batch_ranges.get(name, '(fixed)')} (min, opt, max)"
                )
            ptr = self._buffer(name, array.nbytes)
            self._cuda.to_device(ptr, array, self._stream)
            self._bind(name, ptr)
        results = {}
        for meta in self.outputs:
            shape = tuple(self._context.get_tensor_shape(meta.name))
            host = np.empty(shape, dtype=trt.nptype(self._engine.get_tensor_dtype(meta.name)))
            ptr = self._buffer(meta.name, host.nbytes)
            self._bind(meta.name, ptr)
            results[meta.name] = host
        if not self._context.execute_async_v3(self._cuda.stream_handle(self._stream)):
            raise EngineError(f"{self.name}: TensorRT execution failed (see the TensorRT log)")
        for meta in self.outputs:
            self._cuda.to_host(results[meta.name], self._buffers[meta.name][0], self._stream)
        self._cuda.synchronize(self._stream)
        return results

    def time_gpu(self, feed: Mapping[str, np.ndarray], *, iterations: int = 100, warmup: int = 10,
                 cuda_graph: bool = False):
        """Time `feed` as trtexec does: CUDA events, copies apart, pinned buffers, optional CUDA graph
        (engines.tensorrt.timing.time_engine); returns a GpuTiming."""
        from engines.tensorrt.timing import time_engine

        if not self.is_active:
            raise EngineError(f"runner {self.name} is not active; use it as `with runner:` or call activate()")
        return time_engine(self, feed, iterations=iterations, warmup=warmup, cuda_graph=cuda_graph)

    def timing_session(self, feed: Mapping[str, np.ndarray]):
        """Pinned buffers, device buffers and events for timing `feed` (engines.tensorrt.timing.time_engine)."""
        from engines.tensorrt.timing import TimingSession

        for name, array in feed.items():
            problem = batch_problem(name, array.shape, self.batch_ranges.get(name))
            if problem:
                raise EngineError(f"{self.name}: {problem}")
        trt = _trt()
        context = self._context if self._context is not None else self._poly_runner.context
        engine = context.engine
        if self._stream is None:
            self._stream = self._cuda.stream()
        for name, array in feed.items():
            if not context.set_input_shape(name, array.shape):
                raise EngineError(f"{self.name}: TensorRT refused input '{name}' of shape {tuple(array.shape)}")
        outputs = {meta.name: (tuple(context.get_tensor_shape(meta.name)),
                               np.dtype(trt.nptype(engine.get_tensor_dtype(meta.name)))) for meta in self.outputs}
        saved, self._context = self._context, context
        try:
            return TimingSession(self._cuda, context, self._stream, self._bind, feed, outputs)
        finally:
            self._context = saved

    def _bind(self, name: str, ptr: int) -> None:
        # False: TensorRT refused the address (not a tensor of this engine, or misaligned); enqueueing
        # anyway would run on a stale or null address.
        if not self._context.set_tensor_address(name, ptr):
            raise EngineError(f"{self.name}: TensorRT refused the device address of tensor '{name}' "
                              "(set_tensor_address returned False); see the TensorRT log")

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._cuda.free(ptr)
            ptr, size = self._cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, size)
        return ptr


def quiet_nvtx(trt, context) -> None:
    """Lower the context's NVTX verbosity to layer names: plans are built with DETAILED profiling
    verbosity (the engine inspector needs it for the layer precisions), and NVIDIA's docs (10.3, 11.4)
    say DETAILED NVTX markers generally increase enqueue latency; trtexec times at layer names only."""
    context.nvtx_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY


def engine_io(trt, engine) -> tuple[list[TensorMeta], list[TensorMeta]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = tuple(d if d >= 0 else None for d in engine.get_tensor_shape(name))
        meta = TensorMeta(name, np.dtype(trt.nptype(engine.get_tensor_dtype(name))), shape)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(meta)
    return inputs, outputs


def load(path: str | os.PathLike, *, prefer_polygraphy: bool = True, threads: int | None = None) -> TensorRTRunner:
    """Runner for a plan built by `build`; refuses a plan built for another TensorRT or GPU.

    `threads` is the CPU thread count every backend's `load` takes; TensorRT computes on the GPU, so
    it is accepted and not used.
    """
    artifact = EngineArtifact.load(path, backend="tensorrt")
    problems = check_engine_compatible(artifact.metadata, current_environment())
    if problems:
        raise EngineError(f"{artifact.path.name} cannot run here: {'; '.join(problems)}; rebuild it on this machine")
    runner = TensorRTRunner(artifact.path, prefer_polygraphy=prefer_polygraphy)
    runner.precision_executed = artifact.precision_executed
    return runner
