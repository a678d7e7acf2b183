"""INT8 for OpenVINO: NNCF post-training quantization of the OpenVINO model converted from ONNX.

NNCF works on OpenVINO's own graph (LayerNorm is an MVN there, GELU a Gelu, the attention may be a
ScaledDotProductAttention), so the ops we keep in float are named in OpenVINO's terms: by op type,
by the per-task output layers found from the model's Results, by the residual Adds, and by the user's
`keep_fp32` globs (matched against OpenVINO node names and types).
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.cache import CalibrationCache, cache_key
from calibration.data import CalibrationSet, calibration_for
from calibration.errors import CalibrationError
from engines.cpu import int8_saturates
from engines.files import load_onnx

# OpenVINO op types NNCF must leave in float: normalisations, softmax and GELU/erf.
DEFAULT_IGNORED_TYPES = ("MVN", "NormalizeL2", "Softmax", "SoftMax", "LogSoftmax", "Gelu", "Erf")
_COMPUTE_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
_PASS_THROUGH_TYPES = (
    "Interpolate", "Reshape", "Transpose", "Convert", "Sigmoid", "Relu", "Squeeze", "Unsqueeze",
    "Clamp", "Tanh", "Add", "Subtract", "Multiply", "Divide",
)  # fmt: skip
MODEL_XML, MODEL_BIN = "model.int8.xml", "model.int8.bin"


def overflow_fix_for_this_cpu() -> str:
    """NNCF's overflow fix for the CPU that builds: 'enable' (weights on 7 bits in every layer) where
    uint8 x int8 products saturate (`engines.cpu.int8_saturates`), NNCF's default elsewhere.

    Measured on an AVX2-only CPU with the tests' tiny model: relative error to fp32 0.12 with the
    default (first layer only), 0.015 with every layer fixed. A CPU with VNNI or AMX computes int8
    exactly, and the eighth bit is worth keeping there.
    """
    return "enable" if int8_saturates() else "first_layer_only"


def output_layers(model, max_depth: int = 8) -> list[str]:
    """Friendly names of each task's last Convolution/MatMul (and what follows it up to the Result)."""
    names: list[str] = []
    for result in model.get_results():
        path, node = [], result.input_value(0).get_node()
        for _ in range(max_depth):
            kind = node.get_type_name()
            path.append(node.get_friendly_name())
            if kind in _COMPUTE_TYPES:
                names.extend(n for n in path if n not in names)
                break
            if kind not in _PASS_THROUGH_TYPES:
                break
            variable = [v for v in node.input_values() if v.get_node().get_type_name() != "Constant"]
            if len(variable) != 1:  # a residual sum: the head ends here
                break
            node = variable[0].get_node()
    return names


def residual_adds(model) -> list[str]:
    return [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "Add"
        and sum(v.get_node().get_type_name() != "Constant" for v in op.input_values()) >= 2
    ]


def ignored_scope_for(
    model,
    *,
    keep_fp32: Iterable[str] = (),
    ignored_types: Sequence[str] = DEFAULT_IGNORED_TYPES,
    exclude_output_layers: bool = True,
    exclude_residual_adds: bool = True,
):
    """The nncf.IgnoredScope for `model` (validate=False: absent types are fine)."""
    import nncf

    names: list[str] = []
    if exclude_output_layers:
        names += output_layers(model)
    if exclude_residual_adds:
        names += [n for n in residual_adds(model) if n not in names]
    types = list(ignored_types)
    op_types = {op.get_type_name() for op in model.get_ops()}
    patterns = []
    for glob in keep_fp32:
        types += [t for t in op_types if fnmatch.fnmatchcase(t, glob) and t not in types]
        patterns.append(fnmatch.translate(glob))
    return nncf.IgnoredScope(names=names, patterns=patterns, types=types, validate=False)


def quantize_openvino(
    onnx_path: str | os.PathLike,
    calibration: CalibrationSet | Iterable[Mapping[str, np.ndarray]],
    *,
    keep_fp32: Sequence[str] = (),
    ignored_types: Sequence[str] = DEFAULT_IGNORED_TYPES,
    exclude_output_layers: bool = True,
    target_device: str = "CPU",
    fast_bias_correction: bool = True,
    cache: CalibrationCache | str | os.PathLike | None = None,
) -> tuple[Any, dict[str, Any]]:
    """NNCF-quantize the OpenVINO model of `onnx_path`; returns (openvino.Model, info).

    `subset_size` is the number of calibration samples, so every sample is used. With `cache`, a
    result for the same ONNX bytes, calibration fingerprint and settings is read instead.
    """
    import openvino as ov

    source = load_onnx(onnx_path)
    calibration = calibration_for(source, calibration)
    settings = {
        "kind": "nncf",
        "keep_fp32": list(keep_fp32),
        "ignored_types": list(ignored_types),
        "exclude_output_layers": exclude_output_layers,
        "target_device": target_device,
        "fast_bias_correction": fast_bias_correction,
        "model_type": "transformer",
        "subset_size": calibration.num_samples,
        "overflow_fix": overflow_fix_for_this_cpu(),
    }
    if cache is not None and not isinstance(cache, CalibrationCache):
        cache = CalibrationCache(cache)
    key = cache_key(onnx_path, calibration.fingerprint(), settings) if cache is not None else None
    if cache is not None:
        hit = cache.lookup(key)
        if hit is not None:
            model = ov.Core().read_model(str(hit[MODEL_XML]))
            return model, {"cache": "hit", "key": key, **settings}

    import gc
    import logging

    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from engines.openvino.signal_stack import steady_signal_stack

    # NNCF logs every ignored node at INFO; our progress lines say what matters.
    logging.getLogger("nncf").setLevel(logging.WARNING)
    model = ov.convert_model(str(onnx_path))
    scope = ignored_scope_for(
        model, keep_fp32=keep_fp32, ignored_types=ignored_types, exclude_output_layers=exclude_output_layers
    )
    try:
        device = getattr(nncf.TargetDevice, target_device.upper(), nncf.TargetDevice.ANY)
        quantized = nncf.quantize(
            model,
            nncf.Dataset(calibration),
            model_type=nncf.ModelType.TRANSFORMER,
            target_device=device,
            subset_size=len(calibration),
            fast_bias_correction=fast_bias_correction,
            ignored_scope=scope,
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix(settings["overflow_fix"])),
        )
    except Exception as exc:
        raise CalibrationError(f"NNCF quantization failed: {type(exc).__name__}: {exc}") from exc
    finally:
        # NNCF compiles with Cores of its own; let them go now, then make this thread's signal stack ours
        # again (engines.openvino.signal_stack says why).
        gc.collect()
        steady_signal_stack()
    info = {"cache": "miss" if cache is not None else "off", "key": key, "ignored_names": scope.names, **settings}
    if cache is not None:
        with tempfile.TemporaryDirectory(prefix="mtlora-nncf-") as tmp:
            xml = Path(tmp) / MODEL_XML
            ov.save_model(quantized, str(xml), compress_to_fp16=False)
            cache.store(key, {MODEL_XML: xml, MODEL_BIN: xml.with_suffix(".bin")}, info={"source": str(onnx_path), **settings})
    return quantized, info
