"""Int8 Q/DQ graphs that ONNX Runtime computes exactly on this CPU.

A Q/DQ graph says what int8 arithmetic means; ONNX Runtime's CPU kernels do not always do it.
On an x86 CPU without an int8 dot product, its U8S8 kernels (uint8 activations times int8
weights) add pairs of products in 16 bits and clamp what overflows (`engines.cpu.int8_saturates`);
signed activations go through the same kernels. Its U8U8 kernels widen to 16 bits before they
multiply, so nothing overflows. Shifting an int8 tensor and its zero point by 128 gives the same
numbers on the uint8 grid (q - zp is unchanged), so moving every int8 operand to uint8 changes
which kernels run, never the result: measured on an AVX2 CPU with the tests' tiny model, relative
error to fp32 0.068 before, 0.008 after, at the same speed (0.21 ms a batch either way).

The conversion is made when a session is created, in memory: an engine file stays the same on
every machine (its hashes, the step store and the bundles depend on that), and runs exactly on
whichever CPU opens it.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from engines.cpu import int8_saturates

INT8 = 3  # onnx.TensorProto.INT8
UINT8 = 2  # onnx.TensorProto.UINT8
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def has_int8_operands(model) -> bool:
    """Whether a Q/DQ node of `model` has an int8 zero point or dequantizes an int8 weight."""
    int8 = {init.name for init in model.graph.initializer if init.data_type == INT8}
    return any(name in int8 for node in model.graph.node if node.op_type in _QDQ_OPS for name in node.input)


def to_uint8_operands(model, *, weights: bool = True, activations: bool = True):
    """A copy of `model` with int8 Q/DQ operands moved to uint8 (value + 128, zero point + 128): the
    same function, computed by ONNX Runtime's U8U8 kernels. `weights`: the int8 initializers that a
    DequantizeLinear reads; `activations`: the zero points of QuantizeLinear nodes and of the
    DequantizeLinear nodes that read a quantized activation."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {init.name: init for init in model.graph.initializer}
    weight_names = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in initializers and initializers[n.input[0]].data_type == INT8}
    shifted: dict[str, str] = {}
    quantized: set[str] = set()  # outputs of the QuantizeLinear nodes moved to uint8

    def shift(name: str) -> str:
        if name not in shifted:
            value = numpy_helper.to_array(initializers[name]).astype(np.int16) + 128
            shifted[name] = f"{name}_u8"
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.uint8), shifted[name]))
        return shifted[name]

    for node in model.graph.node:
        if node.op_type not in _QDQ_OPS or len(node.input) < 3:
            continue
        zero_point = initializers.get(node.input[2])
        if zero_point is None or zero_point.data_type != INT8:
            continue
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in weight_names
        if (weights if is_weight else activations):
            if is_weight:
                node.input[0] = shift(node.input[0])
            node.input[2] = shift(node.input[2])
            if node.op_type == "QuantizeLinear":
                quantized.add(node.output[0])
    for info in [*model.graph.value_info, *model.graph.output]:  # types recorded by shape inference
        if info.name in quantized:
            info.type.tensor_type.elem_type = UINT8
    used = {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used or init.name not in shifted]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def exact_int8(model):
    """`model` as this CPU computes it exactly: every int8 operand moved to uint8 where the CPU's
    U8S8 kernels saturate; `model` itself elsewhere, or when it has no int8 operand."""
    if int8_saturates() and has_int8_operands(model):
        return to_uint8_operands(model)
    return model


def session_source(path: str | os.PathLike, providers) -> str | bytes:
    """What to give `InferenceSession` for the ONNX file `path`: the path, or, for a Q/DQ graph that
    the CPU provider would compute with saturating kernels here, the bytes of its exact form."""
    path = Path(path)
    if providers[0] != "CPUExecutionProvider" or not int8_saturates() or not _names_qdq_ops(path):
        return str(path)
    from engines.files import load_onnx

    model = load_onnx(path)
    if not has_int8_operands(model):
        return str(path)
    return to_uint8_operands(model).SerializeToString()


def _names_qdq_ops(path: Path) -> bool:
    """Whether the file's bytes spell a Q/DQ op type. Protobuf stores a node's op_type verbatim, so a
    file without the name has no Q/DQ node and need not be parsed: on a 117 MB fp32 graph this look
    takes 25 ms, parsing it 240 ms (more than opening the session). Weight bytes that happen to spell
    it only cost the full look. A file that cannot be mapped is left to ONNX Runtime to report."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"uantizeLinear") >= 0  # QuantizeLinear and DequantizeLinear
    except (OSError, ValueError):  # missing, unreadable, or empty (mmap refuses 0 bytes)
        return False
