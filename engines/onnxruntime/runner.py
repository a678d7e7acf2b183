"""ONNX Runtime runner: an InferenceSession behind the common Runner interface."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engines.artifact import EngineArtifact, TensorMeta
from engines.cpu import INT8_DOT_PRODUCT, int8_saturates
from engines.errors import BackendUnavailable, EngineError, load_failure
from engines.precision import PRECISIONS
from engines.runner import Runner

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_LEVELS = ("disable", "basic", "extended", "all")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable("onnxruntime is not installed; pip install 'mtlora-export[onnxruntime]'") from exc
    return onnxruntime


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """Provider names ('cpu', 'cuda', 'tensorrt' or full ORT names), checked against this install.

    The CPU provider is appended as the fallback for nodes the first provider cannot run.
    """
    ort = _ort()
    if providers is None:
        providers = ["CPUExecutionProvider"]
    elif isinstance(providers, str):
        providers = [providers]
    resolved = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    available = ort.get_available_providers()
    missing = [p for p in resolved if p not in available]
    if missing:
        raise BackendUnavailable(
            f"onnxruntime here has no {', '.join(missing)} (available: {', '.join(available)}); "
            "install the matching onnxruntime package or choose another provider"
        )
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def session_options(
    *, intra_op_threads: int | None = None, inter_op_threads: int | None = None, optimization_level: str = "all"
):
    ort = _ort()
    if optimization_level not in _LEVELS:
        raise EngineError(f"unknown graph optimization level '{optimization_level}'; choose one of {', '.join(_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization_level]
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    return options


def create_session(path: str | os.PathLike, providers: Sequence[str], options=None):
    """An InferenceSession for the ONNX file `path`; an int8 graph is given the operand types this
    CPU computes exactly (`exact_int8`), so every session of a Q/DQ graph means what the graph says."""
    from engines.onnxruntime.exact_int8 import session_source

    ort = _ort()
    try:
        return ort.InferenceSession(session_source(path, providers), sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise load_failure(path, "onnxruntime", exc) from exc


def io_metadata(args) -> list[TensorMeta]:
    metas = []
    for arg in args:
        if arg.type not in _ORT_TYPES:
            raise EngineError(f"model tensor '{arg.name}' has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
        metas.append(TensorMeta(arg.name, np.dtype(_ORT_TYPES[arg.type]), shape))
    return metas


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file with the given providers ('cpu' by default) and thread counts."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        providers: str | Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        optimization_level: str = "all",
        name: str | None = None,
    ):
        super().__init__(name or f"onnxruntime:{Path(model_path).name}")
        self.model_path = Path(model_path)
        self.providers = resolve_providers(providers)
        self._options = dict(
            intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads, optimization_level=optimization_level
        )
        self.session = None

    def _activate(self) -> None:
        self.session = create_session(self.model_path, self.providers, session_options(**self._options))
        self.inputs = io_metadata(self.session.get_inputs())
        self.outputs = io_metadata(self.session.get_outputs())

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(None, feed)
        except Exception as exc:
            raise EngineError(f"{self.name}: inference failed: {exc}") from exc
        return dict(zip(self.output_names, values, strict=True))


def load(
    path: str | os.PathLike,
    *,
    providers: str | Sequence[str] | None = None,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    optimization_level: str = "all",
) -> OnnxRuntimeRunner:
    """Runner for an engine built by `build` (its sidecar is read and its hashes checked).

    `providers` defaults to the ones the engine was built and verified with.
    """
    artifact = EngineArtifact.load(path, backend="onnxruntime")
    built_with = artifact.metadata.get("providers") or ["CPUExecutionProvider"]
    runner = OnnxRuntimeRunner(
        artifact.path,
        providers=providers if providers is not None else built_with,
        intra_op_threads=threads,
        inter_op_threads=inter_op_threads,
        optimization_level=optimization_level,
    )
    runner.precision_executed = artifact.precision_executed
    if PRECISIONS[artifact.precision_requested].calibrated and runner.providers[0] == "CPUExecutionProvider" \
            and int8_saturates():
        runner.notes.append("int8 weights held as uint8 at load (U8U8 kernels): this CPU has none of "
                            f"{', '.join(INT8_DOT_PRODUCT)}, and its U8S8 kernels would saturate")
    if runner.providers[0] != built_with[0]:
        runner.notes.append(
            f"built and checked with {built_with[0]}, running with {runner.providers[0]}: "
            f"the executed precision '{artifact.precision_executed}' was measured for the former"
        )
    optimized_for = artifact.metadata.get("optimized_for")
    if optimized_for and optimized_for != runner.providers[0]:
        raise EngineError(
            f"{artifact.path.name} was optimized for {optimized_for} and may hold its fused ops; "
            f"rebuild without optimize=True to run it with {runner.providers[0]}"
        )
    return runner
