"""The fp16 Q/DQ graph: the int8 graph a strongly typed TensorRT network is built from.

A strongly typed network runs every layer in the type its graph gives it and has no fallback, so
building int8 from the fp32 Q/DQ graph runs everything between the quantized MatMuls/Convs --
LayerNorm, Softmax, GELU, the residual adds -- in fp32, slower than the fp16 engine on Orin. This
graph is that same Q/DQ graph (same scales, same quantized weights) with the rest in fp16, exactly
as the fp16 graph is: the sensitive ops (LayerNormalization, Softmax, Erf...), the per-task output
layers and `keep_fp32` nodes stay fp32 behind Casts.

In a strongly typed network a DequantizeLinear produces the type of its scale, so the scales become
float16 too; ONNX allows float16 scales from opset 19, so an older graph is converted to opset 19
first. ONNX Runtime's CPU provider runs the result, which is how it is checked here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from calibration.errors import CalibrationError
from calibration.fp16 import FLOAT16, SENSITIVE_FP16_OPS, check_fp16_graph, to_fp16_graph
from engines.files import load_onnx, write_atomic

QDQ_FP16_OPSET = 19  # the first opset whose QuantizeLinear/DequantizeLinear take float16 scales
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_STANDARD_DOMAINS = ("", "ai.onnx")


def to_qdq_fp16_graph(
    qdq_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    keep_fp32: Sequence[str] = (),
    keep_op_types: Sequence[str] = SENSITIVE_FP16_OPS,
    keep_output_layers: bool = True,
) -> Path:
    """Write the fp16 Q/DQ graph of the fp32 Q/DQ graph `qdq_path` to `out_path` and return it.

    Raises CalibrationError when the input has no Q/DQ nodes, cannot be brought to opset 19, or the
    result is not a right fp16 graph with float16-scaled Q/DQ pairs.
    """
    import onnx
    from onnx import version_converter

    qdq_path, out_path = Path(qdq_path), Path(out_path)
    model = load_onnx(qdq_path)
    if not any(n.op_type in _QDQ_OPS for n in model.graph.node):
        raise CalibrationError(f"{qdq_path.name} has no QuantizeLinear/DequantizeLinear nodes; quantize it first")
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)
    if opset < QDQ_FP16_OPSET:
        try:
            model = version_converter.convert_version(model, QDQ_FP16_OPSET)
        except Exception as exc:
            raise CalibrationError(
                f"{qdq_path.name} (opset {opset}) could not be converted to opset {QDQ_FP16_OPSET}, which float16 "
                f"Q/DQ scales need ({type(exc).__name__}: {exc}); export the model at opset {QDQ_FP16_OPSET} or newer"
            ) from exc
    staged = out_path.with_name(f".{out_path.name}.opset{QDQ_FP16_OPSET}")
    write_atomic(staged, model.SerializeToString())
    try:
        to_fp16_graph(staged, out_path, keep_fp32=keep_fp32, keep_op_types=keep_op_types, keep_output_layers=keep_output_layers)
    finally:
        staged.unlink(missing_ok=True)
    converted = load_onnx(out_path)
    # The converter appends its input Casts after their readers; ONNX (and its checker) want
    # producers first. TensorRT's parser sorts anyway, but the file should be valid ONNX.
    _sort_topologically(converted)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        raise CalibrationError(f"the fp16 Q/DQ graph of {qdq_path.name} is not valid ONNX: {exc}") from exc
    problems = check_fp16_graph(converted, keep_op_types=keep_op_types) + _float16_scale_problems(converted)
    if problems:
        raise CalibrationError(f"the fp16 Q/DQ graph of {qdq_path.name} is not right: {'; '.join(problems[:3])}")
    return write_atomic(out_path, converted.SerializeToString())


def _float16_scale_problems(model) -> list[str]:
    """Every Q/DQ scale must be a float16 constant, or the DQ hands fp32 to an fp16 layer."""
    initializers = {i.name: i.data_type for i in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS and initializers.get(node.input[1]) != FLOAT16:
            problems.append(f"{node.op_type} '{node.name}' has scale '{node.input[1]}' that is not a float16 initializer")
    return problems


def _sort_topologically(model) -> None:
    """Reorder the nodes so that every tensor is produced before it is read (stable otherwise)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered, pending = [], list(graph.node)
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise CalibrationError(f"the graph has a cycle or reads undefined tensors at node '{waiting[0].name}'")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
