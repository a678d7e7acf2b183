"""The fp16 graph: a float16 ONNX with explicit Cast nodes and the numerically sensitive ops in fp32.

One graph serves two consumers: ONNX Runtime runs it as is, and TensorRT 11 builds it as a strongly
typed network (TensorRT 11 has no FP16 builder flag; the graph's types are the precision). Inputs and
outputs stay float32 so that callers feed and compare the same arrays as for the fp32 model.

Also holds the small graph helpers that the Q/DQ quantizer shares (which nodes are the per-task
output layers, which nodes a user's `keep_fp32` patterns name).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from calibration.errors import CalibrationError
from engines.files import load_onnx, set_onnx_metadata, write_atomic

# Ops whose fp16 results drift: reductions and normalisations (LayerNorm's variance, Softmax's sum, the
# sum of squares of ReduceL2, which overflows fp16's 65504 once a 3-channel value passes about 148),
# powers and roots that overflow fp16's 65504, and the erf of GELU.
SENSITIVE_FP16_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "Pow", "Sqrt", "Erf", "Gelu")
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops between a task head's last Conv and the graph output that we follow when looking for that Conv.
_PASS_THROUGH_OPS = (
    "Resize", "Upsample", "Reshape", "Transpose", "Identity", "Cast", "Sigmoid", "Relu", "Squeeze",
    "Unsqueeze", "Flatten", "Clip", "Tanh", "Add", "Sub", "Mul", "Div", "BatchNormalization",
    "ArgMax",  # in-graph post-processing: class ids
)  # fmt: skip
_BINARY_OPS = ("Add", "Sub", "Mul", "Div")
# The divisor of an in-graph unit normalisation (x / expand(clip(ReduceL2(x)))): kept with the output layer.
_NORM_DIVISOR_OPS = ("Expand", "Clip", "Max", "ReduceL2", "Sqrt", "ReduceSumSquare", "Add")

KEPT_NODES_KEY = "mtlora.fp16.kept_nodes"
KEPT_OP_TYPES_KEY = "mtlora.fp16.kept_op_types"

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16


# ----------------------------------------------------------------------------- graph helpers


def ensure_node_names(model) -> None:
    """Give every unnamed node a unique name (exclusion lists are lists of names)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def match_nodes(model, patterns: Iterable[str]) -> list[str]:
    """Names of nodes whose name or op type matches any glob pattern (``'*/heads.*'``, ``'Resize'``)."""
    patterns = list(patterns)
    return [
        n.name
        for n in model.graph.node
        if any(fnmatch.fnmatchcase(n.name, p) or fnmatch.fnmatchcase(n.op_type, p) for p in patterns)
    ]


def output_layer_nodes(model, max_depth: int = 8) -> list[str]:
    """The per-task output layers: for each graph output, the nodes from the last Conv/MatMul/Gemm
    up to the output (e.g. ``Conv -> Resize``). Outputs that reach no such op contribute nothing."""
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {i.name for i in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    names: list[str] = []
    for output in model.graph.output:
        path, tensor = [], output.name
        for _ in range(max_depth):
            node = producer.get(tensor)
            if node is None:
                break
            path.append(node.name)
            if node.op_type in COMPUTE_OPS:
                names.extend(n for n in path if n not in names)
                break
            if node.op_type not in _PASS_THROUGH_OPS:
                break
            if node.op_type == "Div" and node.input[0] not in constants:
                if node.input[1] not in constants:  # x / |x|: its norm is part of the output layer too
                    path.extend(n for n in _divisor_nodes(node.input[1], producer, constants) if n not in path)
                tensor = node.input[0]  # x / scale, or x / |x| (in-graph unit normalisation): follow x
            elif node.op_type in _BINARY_OPS:
                variable = [t for t in node.input if t and t not in constants]
                if len(variable) != 1:  # a residual sum, not a bias or a scale: the head ends here
                    break
                tensor = variable[0]
            else:
                tensor = node.input[0]
    return names


def _divisor_nodes(tensor: str, producer, constants, max_depth: int = 4) -> list[str]:
    """The nodes of a normalisation's divisor chain (Expand <- Clip <- ReduceL2), nearest first."""
    names = []
    for _ in range(max_depth):
        node = producer.get(tensor)
        if node is None or node.op_type not in _NORM_DIVISOR_OPS:
            break
        names.append(node.name)
        if node.op_type == "ReduceL2" or node.op_type == "ReduceSumSquare":
            break
        tensor = next((t for t in node.input if t and t not in constants), "")
    return names


UINT8 = 2  # onnx.TensorProto.UINT8
_UINT8_PARTNERS = (FLOAT, FLOAT16)


def cast_uint8_through_float(model) -> int:
    """Make every Cast to UINT8 whose input is not float32/float16 cast through float32 first; returns
    how many. TensorRT converts UINT8 only to or from float32/float16, and ONNX Runtime's quantization
    pre-processing fuses the exporter's ArgMax -> Cast(FLOAT) -> Cast(UINT8) into one Cast from INT64.
    Class ids below 256 are exact in float32, so the result is the same."""
    from onnx import helper

    types = tensor_types(model)
    nodes, changed = [], 0
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        source = types.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if to == UINT8 and source is not None and source not in _UINT8_PARTNERS:
            as_float = f"{node.input[0]}_as_float32"
            nodes.append(helper.make_node("Cast", [node.input[0]], [as_float], name=f"{node.name}_to_float32", to=FLOAT))
            node.input[0] = as_float
            changed += 1
        nodes.append(node)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return changed


def tensor_types(model) -> dict[str, int]:
    """Element type of every tensor we can type: inputs, initializers, Constants, inferred value_info."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference can fail on exotic ops; fall back to the types the model carries
        inferred = model
    types: dict[str, int] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
        elif node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                types[node.output[0]] = to
    return types


# ----------------------------------------------------------------------------- conversion


def to_fp16_graph(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    keep_fp32: Sequence[str] = (),
    keep_op_types: Sequence[str] = SENSITIVE_FP16_OPS,
    keep_output_layers: bool = True,
) -> Path:
    """Write the fp16 graph of `onnx_path` to `out_path` and return it.

    `keep_op_types` run in fp32 (default: the sensitive ops); so do the per-task output layers when
    `keep_output_layers` (each head's last Conv and its Resize), and every node whose name or op type
    matches a `keep_fp32` glob. Inputs and outputs stay float32 (keep_io_types).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = load_onnx(onnx_path)
    ensure_node_names(model)
    kept_nodes = match_nodes(model, keep_fp32)
    if keep_output_layers:
        kept_nodes += [n for n in output_layer_nodes(model) if n not in kept_nodes]
    op_block_list = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_op_types))
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=op_block_list, node_block_list=kept_nodes
        )
    except Exception as exc:
        raise CalibrationError(f"fp16 conversion of {onnx_path} failed: {exc}") from exc
    _drop_fp16_round_trips(converted)
    set_onnx_metadata(converted, KEPT_NODES_KEY, json.dumps(kept_nodes))
    set_onnx_metadata(converted, KEPT_OP_TYPES_KEY, json.dumps(list(keep_op_types)))
    return write_atomic(out_path, converted.SerializeToString())


def _drop_fp16_round_trips(model) -> None:
    """Remove fp32 -> fp16 -> fp32 Cast pairs the converter leaves between two fp32 nodes.

    They appear where a kept node feeds another kept node or a graph output, and silently round the
    very values we kept in fp32 (a kept head's output would come back with fp16 precision).
    """
    types = tensor_types(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    graph_outputs = {o.name for o in model.graph.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    for node in model.graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if cast_to(node) == FLOAT and first is not None and cast_to(first) == FLOAT16:
            if types.get(first.input[0]) == FLOAT:
                node.input[0] = first.input[0]
    # Now fp32 -> fp32 Casts: bypass them (a graph output keeps its Cast as a harmless identity).
    rewire = {}
    for node in model.graph.node:
        if cast_to(node) == FLOAT and types.get(node.input[0]) == FLOAT and node.output[0] not in graph_outputs:
            rewire[node.output[0]] = node.input[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            while name in rewire:
                name = rewire[name]
            node.input[i] = name
    used = {t for node in model.graph.node for t in node.input} | graph_outputs
    alive = [n for n in model.graph.node if n.op_type != "Cast" or n.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(alive)
    # Value infos of removed tensors would be stale.
    produced = {out for node in model.graph.node for out in node.output}
    keep_vi = [vi for vi in model.graph.value_info if vi.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep_vi)


def _get_metadata(model, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


# ----------------------------------------------------------------------------- structural check


def check_fp16_graph(model, *, keep_op_types: Sequence[str] | None = None, kept_nodes: Sequence[str] | None = None) -> list[str]:
    """Problems with an fp16 graph, as sentences; empty when it is right.

    Checks: inputs and outputs are float32; every sensitive op and kept node computes in float32; no
    float32 initializer is left except those only kept nodes read; some Conv/MatMul/Gemm runs in fp16.
    The kept op types and nodes default to what `to_fp16_graph` recorded in the model's metadata.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_onnx(model)
    problems: list[str] = []
    if keep_op_types is None:
        recorded = _get_metadata(model, KEPT_OP_TYPES_KEY)
        keep_op_types = json.loads(recorded) if recorded else list(SENSITIVE_FP16_OPS)
    if kept_nodes is None:
        recorded = _get_metadata(model, KEPT_NODES_KEY)
        kept_nodes = json.loads(recorded) if recorded else []
    keep_types, keep_names = set(keep_op_types), set(kept_nodes)

    for vi in [*model.graph.input, *model.graph.output]:
        # Float I/O stays float32 for the caller; integer outputs (post-processed class ids) are what they are.
        if vi.type.tensor_type.elem_type in (FLOAT16, 11, 16):  # fp16, double, bf16
            problems.append(f"graph input/output '{vi.name}' is not float32")

    types = tensor_types(model)
    initializers = {i.name: i for i in model.graph.initializer}

    def is_kept(node) -> bool:
        return node.op_type in keep_types or node.name in keep_names

    nodes_by_name = {n.name for n in model.graph.node}
    for name in keep_names - nodes_by_name:
        problems.append(f"kept node '{name}' is not in the graph")

    fp16_compute = 0
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
        float_tensors = [t for t in [*node.input, *node.output] if t and types.get(t) in (FLOAT, FLOAT16)]
        if is_kept(node):
            # Resize's scales and such are float32 by definition; only the data path matters here.
            half = [t for t in float_tensors if types.get(t) == FLOAT16]
            if half:
                problems.append(f"{node.op_type} node '{node.name}' should compute in fp32 but touches fp16 {half}")
            for t in node.input:
                if t and t not in types and t not in initializers:
                    problems.append(f"cannot tell the type of '{t}' feeding kept node '{node.name}'")
        elif node.op_type in COMPUTE_OPS and node.input and types.get(node.input[0]) == FLOAT16:
            fp16_compute += 1

    for name, init in initializers.items():
        if init.data_type != FLOAT:
            continue
        readers = consumers.get(name, [])
        not_kept = [n.name for n in readers if not is_kept(n) and not _always_float_input(n, name)]
        if not_kept:
            problems.append(f"float32 weight '{name}' feeds fp16 node(s) {not_kept}")
    if fp16_compute == 0:
        problems.append("no Conv/MatMul/Gemm computes in fp16: the graph was not converted")
    return problems


def _always_float_input(node, tensor: str) -> bool:
    """Inputs that ONNX types as float32 whatever the data type (Resize scales/roi) or mere Casts."""
    if node.op_type == "Cast":
        return True
    if node.op_type == "Resize":
        return tensor in node.input[1:3]
    return False
