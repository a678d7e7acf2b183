"""OpenVINO runner: a compiled model (imported from the exported blob, or compiled from the IR).

The inference precision is always set explicitly: left alone, a CPU with bf16 or fp16 support runs
an "fp32" model in the lower precision. What really runs is read back from the compiled model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.artifact import EngineArtifact, TensorMeta
from engines.cpu import INT8_DOT_PRODUCT, int8_saturates
from engines.errors import BackendUnavailable, EngineError, load_failure
from engines.openvino.signal_stack import core_with_plugins
from engines.precision import PRECISIONS
from engines.runner import Runner

log = logging.getLogger(__name__)

# Our precision names <-> OpenVINO's element type names for INFERENCE_PRECISION_HINT.
HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
PRECISION_OF_HINT = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}
CAPABILITY_OF = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}
INT8_LAYER_TYPES = ("Convolution", "FullyConnected", "MatMul", "Deconvolution", "GroupConvolution", "ScaledDotProductAttention")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")


def _ov():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable("openvino is not installed; pip install 'mtlora-export[openvino]'") from exc
    return openvino


def openvino_version() -> str:
    return _ov().get_version()


def check_device(core, device: str) -> str:
    available = core.available_devices
    base = device.split(".")[0]
    if device not in available and base not in {d.split(".")[0] for d in available}:
        raise BackendUnavailable(f"OpenVINO device {device} is not available here (available: {', '.join(available)})")
    return device


def device_name(core, device: str) -> str:
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        return device


def device_capabilities(core, device: str) -> list[str]:
    try:
        return [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
    except Exception:
        return []


def compile_config(*, inference_precision: str, performance_hint: str = "LATENCY", num_threads: int | None = None) -> dict[str, str]:
    if performance_hint not in PERFORMANCE_HINTS:
        raise EngineError(f"unknown performance hint '{performance_hint}'; choose one of {', '.join(PERFORMANCE_HINTS)}")
    config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": performance_hint}
    if num_threads is not None:
        if int(num_threads) < 1:
            raise EngineError(f"num_threads must be at least 1, got {num_threads}")
        config["INFERENCE_NUM_THREADS"] = str(int(num_threads))
    return config


def read_back_precision(compiled) -> str:
    """INFERENCE_PRECISION_HINT of the compiled model, in our names ('fp32', 'fp16', 'bf16')."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    return PRECISION_OF_HINT.get(name, name)


def runtime_precisions(compiled) -> dict[str, Any]:
    """Counts of runtime precisions over the executed graph, and the int8 compute layers in it."""
    counts: dict[str, int] = {}
    int8_layers = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        if layer_type == "Const":
            continue
        counts[precision] = counts.get(precision, 0) + 1
        if precision in ("u8", "i8") and layer_type in INT8_LAYER_TYPES:
            int8_layers.append(op.get_friendly_name())
    return {"counts": counts, "int8_layers": int8_layers}


def io_metadata(ports, preferred_names: Mapping[str, None] | None = None) -> list[TensorMeta]:
    metas = []
    for port in ports:
        names = port.get_names()
        name = next((n for n in (preferred_names or {}) if n in names), None) or port.get_any_name()
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        metas.append(TensorMeta(name, np.dtype(port.get_element_type().to_dtype()), shape))
    return metas


class OpenVINORunner(Runner):
    """Runs an OpenVINO model: imports `blob` when given, else compiles `xml` with `config`."""

    def __init__(
        self,
        xml: str | os.PathLike,
        *,
        device: str = "CPU",
        config: Mapping[str, str],
        blob: str | os.PathLike | None = None,
        io_names: tuple[list[str], list[str]] = ([], []),
        name: str | None = None,
    ):
        super().__init__(name or f"openvino:{Path(xml).name}@{device}")
        self.xml = Path(xml)
        self.blob = Path(blob) if blob is not None else None
        self.device = device
        self.config = dict(config)
        self._io_names = io_names
        self.compiled = None
        self._request = None
        self._ports: list = []
        self.runtime: dict[str, Any] = {}

    def _activate(self) -> None:
        ov = _ov()
        core = core_with_plugins(ov)
        check_device(core, self.device)
        try:
            if self.blob is not None:
                self.compiled = core.import_model(self.blob.read_bytes(), self.device, self.config)
            else:
                self.compiled = core.compile_model(str(self.xml), self.device, self.config)
        except Exception as exc:
            source = self.blob if self.blob is not None else self.xml
            raise load_failure(source, f"OpenVINO ({self.device})", exc) from exc
        self._request = self.compiled.create_infer_request()
        inputs = io_metadata(self.compiled.inputs, dict.fromkeys(self._io_names[0]))
        self.outputs = io_metadata(self.compiled.outputs, dict.fromkeys(self._io_names[1]))
        self.inputs = inputs
        self._ports = list(self.compiled.outputs)
        self.runtime = runtime_precisions(self.compiled)
        # An int8 model's hint covers its float remainder; int8 is what its compute layers run.
        self.precision_executed = "int8" if self.runtime["int8_layers"] else read_back_precision(self.compiled)

    def _deactivate(self) -> None:
        self._request = None
        self.compiled = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._request.infer(feed)
        except Exception as exc:
            raise EngineError(f"{self.name}: inference failed: {exc}") from exc
        # Copies: the request reuses its output tensors on the next call.
        return {meta.name: np.array(results[port], copy=True) for meta, port in zip(self.outputs, self._ports, strict=True)}


def load(
    path: str | os.PathLike,
    *,
    device: str | None = None,
    threads: int | None = None,
    performance_hint: str | None = None,
    use_blob: bool = True,
    allow_recompile: bool = True,
) -> OpenVINORunner:
    """Runner for an engine built by `build`.

    The exported blob is used only when it was built by this OpenVINO version for this device (same
    device name); otherwise the IR is recompiled, with the same explicit inference precision, and the
    runner's `notes` say why -- or, with `allow_recompile=False`, an EngineError is raised.
    """
    ov = _ov()
    artifact = EngineArtifact.load(path, backend="openvino")
    meta = artifact.metadata
    device = device or artifact.device
    core = core_with_plugins(ov)
    check_device(core, device)
    config = dict(meta.get("config") or compile_config(inference_precision=HINTS[artifact.precision_requested]))
    if performance_hint is not None:
        config.update(compile_config(inference_precision=config["INFERENCE_PRECISION_HINT"], performance_hint=performance_hint))
    if threads is not None:
        config.update(
            compile_config(
                inference_precision=config["INFERENCE_PRECISION_HINT"],
                performance_hint=config.get("PERFORMANCE_HINT", "LATENCY"),
                num_threads=threads,
            )
        )
    blob = next((p for p in artifact.extra_paths if p.suffix == ".blob"), None)
    notes = []
    if use_blob and blob is not None:
        mismatch = blob_mismatch(meta, artifact.device, device, openvino_version(), device_name(core, device))
        if mismatch:
            if not allow_recompile:
                raise EngineError(f"{blob.name} was {mismatch}; rebuild the engine here or allow recompiling from the IR")
            notes.append(f"{blob.name} was {mismatch}: recompiled from {artifact.path.name}")
            log.warning("%s", notes[-1])
            blob = None
    else:
        blob = None
    runner = OpenVINORunner(
        artifact.path,
        device=device,
        config=config,
        blob=blob,
        io_names=([m.name for m in artifact.inputs], [m.name for m in artifact.outputs]),
    )
    fix = (meta.get("nncf") or {}).get("overflow_fix", "first_layer_only")
    if PRECISIONS[artifact.precision_requested].calibrated and device == "CPU" and fix != "enable" and int8_saturates():
        notes.append(f"calibrated with NNCF's overflow fix '{fix}' (for a CPU with an int8 dot product); this CPU "
                     f"has none of {', '.join(INT8_DOT_PRODUCT)}, so its int8 layers may saturate: rebuild the "
                     "int8 engine on this machine")
        log.warning("%s", notes[-1])
    runner.notes.extend(notes)
    runner.precision_executed = artifact.precision_executed
    return runner


def blob_mismatch(meta: Mapping[str, Any], built_device: str, device: str, version: str, name: str) -> str:
    """Why a compiled blob cannot be imported here ('' when it can)."""
    if built_device != device:
        return f"compiled for device {built_device}, not {device}"
    if meta.get("openvino_version") != version:
        return f"compiled by OpenVINO {meta.get('openvino_version')}, this is {version}"
    if meta.get("device_name") != name:
        return f"compiled for {meta.get('device_name')}, this {device} is {name}"
    return ""
