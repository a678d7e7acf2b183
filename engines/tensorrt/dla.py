"""Which layers of a graph a DLA core would run, and which would fall back to the GPU, without TensorRT.

NVIDIA's DL4AGX multi-task sample runs the encoder on the GPU and each decoder in int8 on a DLA core;
`mtlora-export build --layout split --dla heads` does that with the task heads (GPU fallback on).
What a DLA core cannot run falls back to the GPU, and every fallback is a copy between the two and a
split of the DLA graph, so before building on a Jetson you want to know, per head::

    mtlora-export lint --dla graphs/.../head_semseg.onnx

The table below is the ONNX side of the "DLA Supported Layers and Restrictions" section of
NVIDIA's TensorRT developer guide (Orin's DLA 2; Xavier's DLA 1 runs a subset): convolutions,
pooling, activations, scale/batch norm, elementwise arithmetic, concatenation, resize, softmax,
slice. Transformer pieces (MatMul between activations, LayerNormalization, Erf/GELU, Gather, Pow,
reductions) are not DLA layers. DLA also builds static shapes only and runs fp16 and int8 only.
It is a first look, not TensorRT's verdict: restrictions on kernel sizes, padding and the number
of dimensions are not checked; TensorRT's build log ("Layer ... is not supported on DLA, falling
back to GPU") has the final word.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# ONNX ops that map to DLA layers (TensorRT developer guide, DLA supported layers).
DLA_OPS = frozenset({
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu", "LeakyRelu",
    "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Softplus", "HardSigmoid", "BatchNormalization", "Add", "Sub",
    "Mul", "Div", "Max", "Min", "Equal", "Greater", "Less", "Concat", "Resize", "Upsample", "Softmax", "Slice", "LRN",
    "Abs", "Neg", "Identity",
    # layout changes DLA runs in limited forms (and TensorRT often folds away)
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
    # precision boundaries, not layers
    "QuantizeLinear", "DequantizeLinear", "Cast", "Constant",
})  # fmt: skip

# Why a common op is not a DLA layer (anything else outside DLA_OPS: "not a DLA layer").
NOT_ON_DLA = {
    "MatMul": "a matrix product of activations (DLA runs only convolution-shaped products)",
    "Gemm": "a fully connected layer TensorRT does not turn into a DLA convolution here",
    "LayerNormalization": "normalisation layers are GPU-only",
    "Erf": "GELU's erf is a GPU-only unary",
    "Gelu": "GPU-only activation",
    "Pow": "Pow is not a DLA elementwise operation",
    "Sqrt": "Sqrt is not a DLA unary",
    "ReduceMean": "reductions are GPU-only",
    "ReduceL2": "reductions are GPU-only",
    "ReduceSum": "reductions are GPU-only",
    "ArgMax": "TopK/ArgMax is GPU-only",
    "Gather": "gather is GPU-only",
    "Shape": "shape tensors are computed on the GPU",
    "Expand": "broadcast expansion is GPU-only",
    "Where": "select is GPU-only",
}
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class DlaReport:
    """How much of one graph a DLA core would take: counts per op of what falls back, and why."""

    graph: str
    layers: int = 0
    fallback: Counter = field(default_factory=Counter)
    reasons: dict[str, str] = field(default_factory=dict)
    whole_graph: list[str] = field(default_factory=list)  # reasons every layer falls back (precision, shapes)

    @property
    def on_dla(self) -> int:
        return 0 if self.whole_graph else self.layers - sum(self.fallback.values())

    def line(self) -> str:
        head = f"{self.graph}: DLA would run {self.on_dla} of {self.layers} layer(s)"
        parts = list(self.whole_graph)
        parts += [f"{n} {op} ({self.reasons[op]})" for op, n in self.fallback.most_common()]
        return head + (f"; falls back to the GPU: {'; '.join(parts)}" if parts else "; nothing falls back")


def dla_report(model, name: str = "") -> DlaReport:
    """The DLA report of an onnx.ModelProto (layers = nodes that compute: no Constants, Q/DQ or Casts)."""
    report = DlaReport(name or model.graph.name)
    for node in model.graph.node:
        if node.op_type in ("Constant", "Cast", *QDQ):
            continue
        report.layers += 1
        if node.domain not in ("", "ai.onnx") or node.op_type not in DLA_OPS:
            report.fallback[node.op_type] += 1
            report.reasons[node.op_type] = NOT_ON_DLA.get(node.op_type, "not a DLA layer")
    dynamic = [vi.name for vi in model.graph.input
               if any(d.dim_param or (not d.HasField("dim_value")) for d in vi.type.tensor_type.shape.dim)]
    if dynamic:
        report.whole_graph.append(f"dynamic shapes on input(s) {', '.join(dynamic)} (DLA builds static shapes "
                                  "only: build with --max-batch 1 for a fixed batch)")
    has_fp16 = any(i.data_type == 10 for i in model.graph.initializer)
    has_qdq = any(n.op_type in QDQ for n in model.graph.node)
    if not (has_fp16 or has_qdq):
        report.whole_graph.append("an fp32 graph (DLA runs fp16 and int8 only: build the heads at fp16 or int8)")
    return report
