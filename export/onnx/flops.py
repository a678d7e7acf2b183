"""The FLOPs of an ONNX graph: two per multiply-accumulate of every MatMul, Gemm and Conv (torch-free).

Shapes come from ONNX shape inference at batch 1, or from running the graph
once in ONNX Runtime where inference leaves them symbolic; elementwise ops,
softmax and norms are not counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from export.errors import ExportError


def _matmul_macs(a: list[int], b: list[int]) -> int:
    """MACs of numpy-style matmul of shapes a and b (1-D operands promoted as numpy does)."""
    a = [1, *a] if len(a) == 1 else list(a)
    b = [*b, 1] if len(b) == 1 else list(b)
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return int(np.prod(batch, dtype=np.int64)) * a[-2] * a[-1] * b[-1]


def _node_macs(node, shapes: dict[str, list[int] | None]) -> int | None:
    def shape(i: int) -> list[int] | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        s = shapes.get(node.input[i])
        return s if s is not None and all(d is not None for d in s) else None

    if node.op_type == "MatMul":
        a, b = shape(0), shape(1)
        return None if a is None or b is None else _matmul_macs(a, b)
    if node.op_type == "Gemm":
        a, b = shape(0), shape(1)
        if a is None or b is None:
            return None
        attrs = {attr.name: attr.i for attr in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
        n = b[0] if attrs.get("transB") else b[1]
        return m * k * n
    if node.op_type == "Conv":
        weight, out = shape(1), shapes.get(node.output[0])
        if weight is None or out is None or any(d is None for d in out):
            return None
        # Every output element is a dot product over (C_in / group) x kernel.
        return int(np.prod(out, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
    return 0


COUNTED_OPS = ("MatMul", "Gemm", "Conv")


def count_flops(paths: str | os.PathLike | Sequence[str | os.PathLike], batch: int = 1) -> dict[str, Any]:
    """FLOPs of one forward pass at `batch` (2 x MACs of every MatMul, Gemm and Conv), from the ONNX shapes.

    Symbolic input dimensions are set to `batch` and ONNX shape inference (with
    data propagation) fills in the intermediate shapes. Where it cannot (shapes
    computed at run time by Shape/Gather arithmetic, as in a traced timm model),
    the graph is run once with ONNX Runtime at that batch to read the missing
    shapes. Returns {"flops", "by_op": {op: flops}, "uncounted": [nodes whose
    shapes stayed unknown], "shapes_from_run": how many nodes needed the run}.
    Several files (a split layout's backbone and heads) are summed.
    """
    import onnx

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    by_op = dict.fromkeys(COUNTED_OPS, 0)
    by_node: dict[str, int] = {}
    uncounted: list[str] = []
    from_run = 0
    for path in paths:
        model = onnx.load(str(path))
        initializers = {init.name for init in model.graph.initializer}
        for value in model.graph.input:
            if value.name in initializers:
                continue
            for dim in value.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value"):
                    dim.dim_value = batch  # the dims are a oneof: this clears dim_param
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
            raise ExportError(f"{path}: ONNX shape inference failed, cannot count FLOPs: {err}") from None
        shapes = _static_shapes(inferred)
        nodes = [n for n in inferred.graph.node if n.op_type in COUNTED_OPS]
        unknown = [n for n in nodes if _node_macs(n, shapes) is None]
        if unknown:
            wanted = {name for n in unknown for name in (*n.input[:2], n.output[0])
                      if name and (shapes.get(name) is None or None in shapes[name])}
            shapes.update(_shapes_by_running(model, sorted(wanted), batch))
            from_run += len(unknown)
        for node in nodes:
            macs = _node_macs(node, shapes)
            if macs is None:
                uncounted.append(node.name or node.op_type)
            else:
                by_op[node.op_type] += 2 * macs
                by_node[node.name] = by_node.get(node.name, 0) + 2 * macs
    return {"flops": sum(by_op.values()), "by_op": by_op, "by_node": by_node, "uncounted": uncounted, "batch": batch,
            "shapes_from_run": from_run}


def _static_shapes(model) -> dict[str, list[int | None] | None]:
    shapes: dict[str, list[int | None] | None] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor = value.type.tensor_type
        shapes[value.name] = ([d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
                              if tensor.HasField("shape") else None)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _shapes_by_running(model, names: list[str], batch: int) -> dict[str, list[int]]:
    """Shapes of the float tensors `names`, read by running `model` once on zeros with ONNX Runtime."""
    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    initializers = {init.name for init in probe.graph.initializer}
    feed = {}
    for value in probe.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in tensor.shape.dim]
        feed[value.name] = np.zeros(dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
        values = session.run(wanted, feed)
    except Exception:  # noqa: BLE001 - the count then reports these nodes as uncounted
        return {}
    return {name: list(value.shape) for name, value in zip(wanted, values, strict=True)}
