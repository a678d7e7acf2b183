"""TensorRT runner (TensorRT 10 and 11): Polygraphy's TrtRunner when installed, else a thin
name-based runner on cuda-python (pycuda as the last resort).

An engine plan only runs on the TensorRT version and GPU compute capability it was built for, so
`load` compares the sidecar with this machine and refuses a mismatch before deserializing anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


# ----------------------------------------------------------------------------- CUDA access


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
            raise EngineError(f"CUDA {what} failed: {message.decode() if isinstance(message, bytes) else message}")
        return rest[0] if len(rest) == 1 else rest

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
            "cuda_runtime_version": _cuda_version(runtime),
            "cuda_driver_version": _cuda_version(driver),
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


class _PyCuda:
    """Fallback for machines with pycuda and no cuda-python."""

    def __init__(self):
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self._context = cuda.Device(0).retain_primary_context()
        self._context.push()
        self._allocations: dict[int, Any] = {}

    def device_info(self, device: int = 0) -> dict[str, str]:
        dev = self.cuda.Device(device)
        major, minor = dev.compute_capability()
        return {
            "gpu_name": dev.name(),
            "compute_capability": f"{major}.{minor}",
            "cuda_runtime_version": ".".join(map(str, self.cuda.get_version())),
            "cuda_driver_version": _cuda_version(self.cuda.get_driver_version()),
        }

    def stream(self):
        return self.cuda.Stream()

    def stream_handle(self, stream) -> int:
        return stream.handle

    def synchronize(self, stream) -> None:
        stream.synchronize()

    def destroy_stream(self, stream) -> None:
        pass

    def malloc(self, nbytes: int) -> int:
        allocation = self.cuda.mem_alloc(max(nbytes, 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        self._allocations.pop(ptr).free()

    def to_device(self, ptr: int, array: np.ndarray, stream) -> None:
        self.cuda.memcpy_htod_async(ptr, array, stream)

    def to_host(self, array: np.ndarray, ptr: int, stream) -> None:
        self.cuda.memcpy_dtoh_async(array, ptr, stream)


def cuda_api():
    """cuda-python if installed, else pycuda; BackendUnavailable when neither is."""
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _PyCuda()
    except ImportError:
        raise BackendUnavailable("neither cuda-python nor pycuda is installed; pip install cuda-python") from None


def _cuda_version(encoded: int) -> str:
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


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


# ----------------------------------------------------------------------------- runners


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT plan (TensorRT 10/11 name-based I/O API)."""

    def __init__(self, plan_path: str | os.PathLike, *, name: str | None = None, prefer_polygraphy: bool = True):
        super().__init__(name or f"tensorrt:{Path(plan_path).name}")
        self.plan_path = Path(plan_path)
        self.prefer_polygraphy = prefer_polygraphy
        self._poly_runner = None
        self._engine = None
        self._context = None
        self._cuda = None
        self._stream = None
        self._buffers: dict[str, tuple[int, int]] = {}

    def _activate(self) -> None:
        trt = _trt()
        plan = self.plan_path.read_bytes()
        poly = _polygraphy_trt() if self.prefer_polygraphy else None
        if poly is not None:
            self._poly_runner = poly.TrtRunner(poly.EngineFromBytes(plan))
            self._poly_runner.activate()
            engine = self._poly_runner.context.engine
        else:
            self._cuda = cuda_api()
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise EngineError(f"TensorRT could not deserialize {self.plan_path.name}; rebuild it on this machine")
            self._context = self._engine.create_execution_context()
            self._stream = self._cuda.stream()
            engine = self._engine
        self.inputs, self.outputs = engine_io(trt, engine)

    def _deactivate(self) -> None:
        if self._poly_runner is not None:
            self._poly_runner.deactivate()
            self._poly_runner = None
            return
        for ptr, _ in self._buffers.values():
            self._cuda.free(ptr)
        self._buffers.clear()
        if self._stream is not None:
            self._cuda.destroy_stream(self._stream)
        self._context = self._engine = self._stream = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._poly_runner is not None:
            outputs = self._poly_runner.infer(feed)
            # Polygraphy hands out views of buffers it reuses on the next call.
            return {meta.name: np.array(outputs[meta.name], copy=True) for meta in self.outputs}
        trt = _trt()
        for name, array in feed.items():
            self._context.set_input_shape(name, array.shape)
            ptr = self._buffer(name, array.nbytes)
            self._cuda.to_device(ptr, array, self._stream)
            self._context.set_tensor_address(name, ptr)
        results = {}
        for meta in self.outputs:
            shape = tuple(self._context.get_tensor_shape(meta.name))
            host = np.empty(shape, dtype=trt.nptype(self._engine.get_tensor_dtype(meta.name)))
            ptr = self._buffer(meta.name, host.nbytes)
            self._context.set_tensor_address(meta.name, ptr)
            results[meta.name] = host
        if not self._context.execute_async_v3(self._cuda.stream_handle(self._stream)):
            raise EngineError(f"{self.name}: TensorRT execution failed (see the TensorRT log)")
        for meta in self.outputs:
            self._cuda.to_host(results[meta.name], self._buffers[meta.name][0], self._stream)
        self._cuda.synchronize(self._stream)
        return results

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._cuda.free(ptr)
            ptr, size = self._cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, size)
        return ptr


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

    `threads` is accepted like every backend's and unused: TensorRT runs on the GPU."""
    artifact = EngineArtifact.load(path, backend="tensorrt")
    problems = check_engine_compatible(artifact.metadata, current_environment())
    if problems:
        raise EngineError(f"{artifact.path.name} cannot run here: {'; '.join(problems)}; rebuild it on this machine")
    runner = TensorRTRunner(artifact.path, prefer_polygraphy=prefer_polygraphy)
    runner.precision_executed = artifact.precision_executed
    return runner
