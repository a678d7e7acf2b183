"""One Q/DQ INT8 ONNX for both TensorRT (explicit quantization) and ONNX Runtime.

TensorRT only accepts symmetric int8 Q/DQ: zero points of 0, int8 (not uint8) types, per-channel
scales on weights along the output-channel axis and per-tensor scales on activations. So we run
ONNX Runtime's static quantizer in QDQ format with exactly those settings, keep biases in float, and
check the result structurally (`check_qdq_conventions`) before anyone builds from it.

The numerically sensitive ops stay in float: LayerNormalization, Softmax, GELU (Erf), residual Adds,
the per-task output layers, and every node a user's `keep_fp32` globs match.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from calibration.cache import CalibrationCache, cache_key
from calibration.data import CalibrationSet, calibration_for
from calibration.errors import CalibrationError
from calibration.fp16 import COMPUTE_OPS, ensure_node_names, match_nodes, output_layer_nodes
from calibration.methods import CALIBRATION_METHODS
from engines.files import copy_atomic, load_onnx, set_onnx_metadata, write_atomic

DEFAULT_EXCLUDED_OP_TYPES = ("LayerNormalization", "Softmax", "Gelu", "Erf")
# TensorRT's guidance for explicit quantization: Q/DQ on the inputs of the GEMM-like ops only;
# everything else fuses around them or runs in float.
DEFAULT_OP_TYPES_TO_QUANTIZE = ("Conv", "MatMul", "Gemm")

EXCLUDED_NODES_KEY = "mtlora.qdq.excluded_nodes"
EXCLUDED_OP_TYPES_KEY = "mtlora.qdq.excluded_op_types"
SETTINGS_KEY = "mtlora.qdq.settings"
RESULT_NAME = "model.qdq.onnx"

INT8 = 3  # onnx.TensorProto.INT8
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_STANDARD_DOMAINS = ("", "ai.onnx")


# ONNX Runtime's histogram calibrators (percentile, entropy) keep every intermediate tensor of every
# calibration feed until they build their histograms: about 9 MB a feed for the 64x64 test model, far
# more at 448x448. Collecting at most this many feeds at a time and merging the histograms as it goes
# keeps memory flat however many samples there are.
CALIBRATION_CHUNK = 8


def calibration_chunk(num_feeds: int, most: int = CALIBRATION_CHUNK) -> int:
    """Feeds per collection pass; fixed, so memory does not depend on the count and results are deterministic."""
    return max(1, min(num_feeds, most))


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol (`get_next`, `rewind`, `set_range`) over a CalibrationSet.

    ONNX Runtime asks for the ranges of a strided collection in order, so one pass over the (streamed)
    set serves them all: `set_range` only says how many feeds the next collection pass gets. Its
    strided collection wants a length that is a multiple of the chunk, so `len` is rounded up to one;
    the last pass is then short (never empty, as the rounding adds less than a chunk).
    """

    def __init__(self, calibration: CalibrationSet, chunk: int | None = None):
        self._calibration = calibration
        self.chunk = chunk or calibration_chunk(len(calibration))
        self._iterator = None
        self._left: int | None = None

    def get_next(self):
        if self._iterator is None:
            self._iterator = iter(self._calibration)
        if self._left is not None:
            if self._left <= 0:
                return None
            self._left -= 1
        return next(self._iterator, None)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._left = end_index - start_index

    def rewind(self) -> None:
        self._iterator = None
        self._left = None

    def __len__(self) -> int:
        return -(-len(self._calibration) // self.chunk) * self.chunk


def residual_adds(model) -> list[str]:
    """Add nodes whose two inputs are both computed (not a constant bias): the residual sums."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Add" and len([t for t in n.input if t and t not in constants]) >= 2
    ]


def batched_weight_matmuls(model) -> list[str]:
    """MatMul nodes whose constant weight has more than two axes (export.onnx.fold's stacked task factors).

    ONNX Runtime's integer MatMul kernels take only a 2-D weight (a per-channel zero point of a
    stacked (T, in, r) weight is refused at run time), so these stay float; they are rank-r factors.
    """
    dims = {i.name: len(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and any(dims.get(t, 0) > 2 for t in n.input)]


def excluded_nodes(
    model,
    *,
    keep_fp32: Iterable[str] = (),
    exclude_op_types: Iterable[str] = DEFAULT_EXCLUDED_OP_TYPES,
    exclude_residual_adds: bool = True,
    exclude_output_layers: bool = True,
) -> list[str]:
    """Names of the nodes to keep in float (ORT's `nodes_to_exclude`), in graph order."""
    ensure_node_names(model)
    exclude_op_types = set(exclude_op_types)
    chosen = {n.name for n in model.graph.node if n.op_type in exclude_op_types}
    chosen |= set(match_nodes(model, keep_fp32))
    chosen |= set(batched_weight_matmuls(model))
    if exclude_residual_adds:
        chosen |= set(residual_adds(model))
    if exclude_output_layers:
        chosen |= set(output_layer_nodes(model))
    return [n.name for n in model.graph.node if n.name in chosen]


def quantize_qdq(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: CalibrationSet | Iterable[Mapping[str, np.ndarray]],
    *,
    method: str = "percentile",
    percentile: float = 99.999,
    keep_fp32: Sequence[str] = (),
    exclude_op_types: Sequence[str] = DEFAULT_EXCLUDED_OP_TYPES,
    exclude_output_layers: bool = True,
    op_types_to_quantize: Sequence[str] = DEFAULT_OP_TYPES_TO_QUANTIZE,
    per_channel: bool = True,
    cache: CalibrationCache | str | os.PathLike | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Path:
    """Calibrate `onnx_path` on `calibration` and write the Q/DQ int8 ONNX to `out_path`.

    `method`: 'percentile' (default: clips the rare outliers transformer activations have, which
    min/max would spend the int8 range on), 'minmax' (exact range; fine for small, clean sets) or
    'entropy' (KL divergence; slowest). With `cache`, a result computed from the same ONNX bytes,
    calibration fingerprint and settings is reused instead of recalibrating.
    """
    if method not in CALIBRATION_METHODS:
        raise CalibrationError(f"unknown calibration method '{method}'; choose one of {', '.join(CALIBRATION_METHODS)}")
    if method == "percentile" and not 90.0 <= percentile <= 100.0:
        raise CalibrationError(f"percentile must be within [90, 100], got {percentile}")
    model = load_onnx(onnx_path)
    calibration = calibration_for(model, calibration)
    settings = {
        "kind": "qdq",
        "method": method,
        "percentile": percentile if method == "percentile" else None,
        "keep_fp32": list(keep_fp32),
        "exclude_op_types": list(exclude_op_types),
        "exclude_output_layers": exclude_output_layers,
        "op_types_to_quantize": list(op_types_to_quantize),
        "per_channel": per_channel,
        # Histograms merged chunk by chunk differ slightly from one built at once; see CALIBRATION_CHUNK.
        "collection_chunk": calibration_chunk(len(calibration)),
    }
    if cache is not None and not isinstance(cache, CalibrationCache):
        cache = CalibrationCache(cache)
    key = cache_key(onnx_path, calibration.fingerprint(), settings) if cache is not None else None
    if cache is not None:
        hit = cache.lookup(key)
        if hit is not None:
            return copy_atomic(hit[RESULT_NAME], out_path)

    with tempfile.TemporaryDirectory(prefix="mtlora-qdq-") as tmp:
        prepared = _preprocess(Path(onnx_path), Path(tmp))
        pre_model = load_onnx(prepared)
        ensure_node_names(pre_model)
        exclude = excluded_nodes(
            pre_model,
            keep_fp32=keep_fp32,
            exclude_op_types=exclude_op_types,
            exclude_output_layers=exclude_output_layers,
        )
        write_atomic(prepared, pre_model.SerializeToString())
        quantized_path = Path(tmp) / RESULT_NAME
        _quantize_static(
            prepared, quantized_path, calibration, method, percentile, exclude, op_types_to_quantize, per_channel, providers
        )
        quantized = load_onnx(quantized_path)
    set_onnx_metadata(quantized, EXCLUDED_NODES_KEY, json.dumps(exclude))
    set_onnx_metadata(quantized, EXCLUDED_OP_TYPES_KEY, json.dumps(list(exclude_op_types)))
    set_onnx_metadata(quantized, SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    problems = check_qdq_conventions(quantized)
    if problems:
        raise CalibrationError(f"the Q/DQ model breaks TensorRT's conventions: {'; '.join(problems[:5])}")
    out_path = write_atomic(out_path, quantized.SerializeToString())
    if cache is not None:
        cache.store(key, {RESULT_NAME: out_path}, info={"source": str(onnx_path), "settings": settings})
    return out_path


def _preprocess(onnx_path: Path, tmp: Path) -> Path:
    """ORT's quantization pre-processing: ONNX shape inference and graph cleanup."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp / "prepared.onnx"
    # Our exported graphs have static shapes except the batch, so ONNX's own shape inference is
    # enough. ORT's symbolic pass would cost seconds (sympy) and, when it gives up, leaves
    # sym_shape_infer_temp.onnx and its external data in the working directory.
    try:
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    except Exception as exc:
        raise CalibrationError(f"quantization pre-processing of {onnx_path} failed: {exc}") from exc
    return prepared


def _quantize_static(
    prepared: Path,
    out: Path,
    calibration: CalibrationSet,
    method: str,
    percentile: float,
    exclude: list[str],
    op_types: Sequence[str],
    per_channel: bool,
    providers: Sequence[str],
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    extra_options = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": True,
        # TensorRT dequantizes int8 only; an int32 bias DQ would not parse.
        "QuantizeBias": False,
        # MatMul weights are (K, N): the output channel is axis 1.
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        # Q/DQ on the inputs of GEMM-like ops only: a Q on their output would round the pre-bias sum.
        "OpTypesToExcludeOutputQuantization": list(op_types),
    }
    if method == "percentile":
        extra_options["CalibPercentile"] = percentile
    reader = _FeedReader(calibration)
    # Despite its name, ONNX Runtime applies the stride to every calibrator; see CALIBRATION_CHUNK.
    extra_options["CalibStridedMinMax"] = reader.chunk
    try:
        # ONNX Runtime prints a line per collection pass on stdout, which belongs to our command's results.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=calibrate_method,
                calibration_providers=list(providers),
                extra_options=extra_options,
            )
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"int8 calibration failed: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- structural check


def check_qdq_conventions(
    model,
    *,
    excluded_op_types: Sequence[str] | None = None,
    excluded_node_names: Sequence[str] | None = None,
) -> list[str]:
    """Problems that would stop TensorRT (or change its numerics) in a Q/DQ ONNX; empty when none.

    Checks every QuantizeLinear/DequantizeLinear: standard domain, int8 zero point that is 0, float
    scale; weight DQs per-channel (axis attribute, one scale per output channel); activation Q/DQ
    per-tensor (scalar scale); no DequantizeLinear feeding an excluded op type or node; opset >= 13;
    no non-standard op domains. Exclusions default to what `quantize_qdq` recorded in the model.
    """
    from onnx import numpy_helper

    if isinstance(model, (str, os.PathLike)):
        model = load_onnx(model)
    meta = {p.key: p.value for p in model.metadata_props}
    if excluded_op_types is None:
        excluded_op_types = json.loads(meta.get(EXCLUDED_OP_TYPES_KEY, "null")) or list(DEFAULT_EXCLUDED_OP_TYPES)
    if excluded_node_names is None:
        excluded_node_names = json.loads(meta.get(EXCLUDED_NODES_KEY, "null")) or []
    excluded_types, excluded_names = set(excluded_op_types), set(excluded_node_names)

    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)
    if opset < 13:
        problems.append(f"opset {opset} < 13: per-channel Q/DQ needs opset 13 or newer")

    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    weight_dtypes = {i.name: i.data_type for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    qdq_nodes = [n for n in model.graph.node if n.op_type in _QDQ_OPS]
    if not qdq_nodes:
        problems.append("no QuantizeLinear/DequantizeLinear nodes: this is not a Q/DQ model")
    nonstandard = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in _STANDARD_DOMAINS})
    if nonstandard:
        problems.append(f"non-standard ops TensorRT cannot parse: {', '.join(nonstandard)}")

    quantized_compute = 0
    for node in qdq_nodes:
        label = f"{node.op_type} '{node.name}'"
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{label} has no zero point (defaults to uint8); TensorRT needs an int8 zero point of 0")
            continue
        zero_point, scale = constants.get(node.input[2]), constants.get(node.input[1])
        if zero_point is None or scale is None:
            problems.append(f"{label} has a computed scale or zero point; TensorRT needs constants")
            continue
        if zero_point.dtype != np.int8:
            problems.append(f"{label} zero point is {zero_point.dtype}, not int8 (symmetric int8 only)")
        if np.any(zero_point != 0):
            problems.append(f"{label} zero point is not 0 (asymmetric quantization)")
        if scale.dtype != np.float32 or np.any(scale <= 0):
            problems.append(f"{label} scale must be positive float32")
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        x = node.input[0]
        is_weight = node.op_type == "DequantizeLinear" and x in constants
        if is_weight:
            readers = consumers.get(node.output[0], [])
            feeds_weight_slot = [r for r in readers if r.op_type in COMPUTE_OPS and len(r.input) > 1 and r.input[1] == node.output[0]]
            if x in weight_dtypes and weight_dtypes[x] != INT8:
                problems.append(f"{label} dequantizes a weight stored as type {weight_dtypes[x]}, not int8")
            if feeds_weight_slot:
                quantized_compute += len(feeds_weight_slot)
                weight = constants[x]
                if axis is None or scale.ndim != 1:
                    problems.append(f"{label}: weight '{x}' is quantized per-tensor; TensorRT expects per-channel")
                elif scale.shape[0] != weight.shape[axis]:
                    problems.append(f"{label}: {scale.shape[0]} scales for {weight.shape[axis]} channels on axis {axis}")
        elif scale.size != 1 or scale.ndim != 0:
            problems.append(f"{label}: activation '{x}' has scale of shape {scale.shape}; activations must be per-tensor")
    for node in model.graph.node:
        if node.op_type in excluded_types or node.name in excluded_names:
            quantized_inputs = [t for t in node.input if t in producer and producer[t].op_type == "DequantizeLinear"]
            if quantized_inputs:
                problems.append(f"excluded {node.op_type} '{node.name}' reads dequantized {quantized_inputs}")
    if qdq_nodes and quantized_compute == 0:
        problems.append("no Conv/MatMul/Gemm has a quantized weight: nothing runs in int8")
    return problems


# ----------------------------------------------------------------------------- ONNX Runtime's flavour


def to_uint8_activations(model):
    """The same quantization with uint8 activations: every activation Q/DQ pair's int8 zero point 0
    becomes a uint8 zero point 128; weights stay int8 (symmetric, per channel).

    The int8 grid [-128, 127] x scale and the uint8 grid [0, 255] - 128 x scale are the same numbers,
    so the outputs are the same; but ONNX Runtime's x86 CPU kernels are written for uint8 activations
    times int8 weights (U8S8), and run the signed-activation graph much slower (docs/benchmarks.md).
    TensorRT takes only the signed form, so this is a second graph beside the TensorRT one. (Where
    U8S8 saturates, the session moves the weights to uint8 too: `engines.onnxruntime.exact_int8`.)
    """
    from engines.onnxruntime.exact_int8 import to_uint8_operands

    model = to_uint8_operands(model, weights=False)
    set_onnx_metadata(model, ACTIVATION_TYPE_KEY, "uint8")
    return model


ACTIVATION_TYPE_KEY = "mtlora.qdq.activation_type"
