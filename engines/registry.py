"""The backend table: what each backend supports, whether it is usable here, and which one 'auto' picks.

Nothing here imports a backend SDK at module level; `available()` imports it when asked.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from engines.errors import BackendUnavailable, EngineError
from engines.precision import built_by

AUTO_ORDER = ("tensorrt", "openvino", "onnxruntime")
# The precision table (`engines.precision`) says which backends build each precision; each backend's row
# below reads its list from there.


# cuInit results worth naming (CUresult); any other nonzero one is reported by its number.
CU_INIT_ERRORS = {
    3: "the CUDA driver failed to initialise",
    34: "the CUDA driver found is a stub library, not a real driver",
    46: "every CUDA device is busy or unavailable",
    100: "the CUDA driver reports no GPU",
    803: "the NVIDIA kernel driver and its user-mode library have different versions",
    804: "this GPU does not support the installed forward-compatibility driver",
}


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA GPUs the driver reports, and why it is 0 when it is; no torch, no CUDA toolkit."""
    lib = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no CUDA driver (libcuda) found"
    result = lib.cuInit(0)
    if result != 0:
        return 0, f"{CU_INIT_ERRORS.get(result, 'the CUDA driver failed to initialise')} (cuInit error {result})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the CUDA driver reports no GPU"
    return count.value, f"{count.value} CUDA GPU(s)"


def _probe_tensorrt() -> tuple[bool, str]:
    try:
        import tensorrt
    except ImportError:
        return False, "the tensorrt Python package is not installed"
    except Exception as exc:  # a broken install (missing libnvinfer) raises OSError and friends
        return False, f"tensorrt failed to import ({type(exc).__name__}: {exc})"
    gpus, why = cuda_device_count()
    if gpus == 0:
        return False, f"tensorrt {tensorrt.__version__} is installed but {why}"
    # The driver may see a GPU that the CUDA bindings the backend uses cannot (cuda-python 13 on a
    # CUDA 12 driver, no bindings at all): ask them, so that 'auto' falls back instead of failing later.
    from engines.tensorrt.runner import cuda_api

    try:
        device = cuda_api().device_info()
    except EngineError as exc:  # BackendUnavailable for "no usable GPU", EngineError for any other CUDA failure
        return False, f"tensorrt {tensorrt.__version__} is installed but CUDA is not usable: {exc}"
    return True, f"tensorrt {tensorrt.__version__} with {why} ({device['gpu_name']}, CUDA driver {device['cuda_driver_version']})"


def _probe_openvino() -> tuple[bool, str]:
    try:
        import openvino
    except ImportError:
        return False, "the openvino Python package is not installed"
    except Exception as exc:
        return False, f"openvino failed to import ({type(exc).__name__}: {exc})"
    from engines.openvino.signal_stack import core_with_plugins

    devices = core_with_plugins(openvino).available_devices
    if not devices:
        return False, f"openvino {openvino.get_version()} sees no device"
    return True, f"openvino {openvino.get_version().split('-')[0]} on {', '.join(devices)}"


def _probe_onnxruntime() -> tuple[bool, str]:
    try:
        import onnxruntime
    except ImportError:
        return False, "the onnxruntime Python package is not installed"
    except Exception as exc:
        return False, f"onnxruntime failed to import ({type(exc).__name__}: {exc})"
    return True, f"onnxruntime {onnxruntime.__version__} with {', '.join(onnxruntime.get_available_providers())}"


@dataclass(frozen=True)
class BackendSpec:
    """One row of the backend table."""

    name: str
    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    suffix: str  # the engine file's suffix; its sidecar is <engine><suffix>.json
    module: str
    probe: Callable[[], tuple[bool, str]]
    # Build options only this backend takes (passed to its `build` when the user gives them).
    build_options: tuple[str, ...] = ()
    # Whether its `build` keeps caches (timing cache, plans) in a directory it is given (`cache_dir`),
    # and whether it can put graphs on a DLA core (`dla_core`).
    build_cache: bool = False
    dla: bool = False
    # Whether its `build` takes the prepared graph's fp32 nodes (`keep_fp32`) and pins those layers itself
    # (TensorRT's weak typing); elsewhere the prepared graph carries them.
    pins_layers: bool = False

    def available(self) -> tuple[bool, str]:
        """(usable here, one-line reason)."""
        return self.probe()

    def check_precision(self, precision: str) -> str:
        if precision not in self.precisions:
            raise EngineError(
                f"{self.name} cannot build precision '{precision}'; choose one of {', '.join(self.precisions)}"
            )
        return precision


BACKENDS: dict[str, BackendSpec] = {
    "tensorrt": BackendSpec(
        name="tensorrt",
        precisions=built_by("tensorrt"),
        devices=("cuda",),
        suffix=".plan",
        module="engines.tensorrt",
        probe=_probe_tensorrt,
        build_options=("max_batch", "workspace_mib", "optimization_level"),
        build_cache=True,
        dla=True,
        pins_layers=True,
    ),
    "openvino": BackendSpec(
        name="openvino",
        precisions=built_by("openvino"),
        devices=("CPU", "GPU", "NPU"),
        suffix=".xml",
        module="engines.openvino",
        probe=_probe_openvino,
    ),
    "onnxruntime": BackendSpec(
        name="onnxruntime",
        precisions=built_by("onnxruntime"),
        devices=("cpu", "cuda", "tensorrt"),
        suffix=".onnx",
        module="engines.onnxruntime",
        probe=_probe_onnxruntime,
    ),
}


def get_spec(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise EngineError(f"unknown backend '{name}'; choose one of auto, {', '.join(BACKENDS)}") from None


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """Resolve 'auto' (TensorRT, else OpenVINO, else ONNX Runtime) or check a named backend.

    Returns (backend name, one-line notice saying why). Raises BackendUnavailable when a named
    backend, or every backend for 'auto', is unusable here.
    """
    if requested != "auto":
        spec = get_spec(requested)
        ok, reason = spec.available()
        if not ok:
            raise BackendUnavailable(f"backend {requested} is not usable: {reason}; install it or pick another")
        return requested, f"using {requested}: {reason}"
    skipped = []
    for name in AUTO_ORDER:
        ok, reason = BACKENDS[name].available()
        if ok:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            return name, f"auto chose {name}: {reason}{why}"
        skipped.append(f"not {name}: {reason}")
    raise BackendUnavailable(f"no backend is usable ({'; '.join(skipped)}); install onnxruntime at least")


def get_backend(name: str, *, check: bool = True) -> ModuleType:
    """The backend module (exposing `build(...)` and `load(...)`); `check` first makes sure it is usable."""
    if name == "auto":
        name, _ = choose_backend("auto")
    spec = get_spec(name)
    if check:
        ok, reason = spec.available()
        if not ok:
            raise BackendUnavailable(f"backend {name} is not usable: {reason}; install it or pick another")
    return importlib.import_module(spec.module)
