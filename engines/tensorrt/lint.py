"""Check an ONNX graph against what TensorRT's ONNX parser and strongly typed builder accept, without TensorRT.

    findings = lint_graph("model.fp16.onnx", "tensorrt-10.3")
    print(format_findings(findings))

Rules (each finding names the node, its op and the rule):

- ``opset``: the graph's ONNX opset is outside the range the target's parser reads.
- ``operator``: an op the target's parser does not import (or one from a custom domain, which would
  need a plugin).
- ``type``: a tensor of a type the target refuses for that op, e.g. INT64 into a MatMul, DOUBLE
  anywhere, UINT8 inside the network, int8 outside a Q/DQ pair.
- ``quantization``: explicit quantization TensorRT does not take: a nonzero (asymmetric) zero point,
  a Q/DQ type the target has no kernels for, a scale or zero point that is computed rather than
  constant, per-channel scales on an activation or along the wrong weight axis.
- ``data-dependent``: control flow (If, Loop, Scan) or data-dependent shapes (NonZero, Unique,
  NonMaxSuppression): TensorRT builds them, but they defeat the optimisation profile and fusion.
- ``strong-typing``: what a strongly typed network (the only kind TensorRT 11 builds) refuses or
  would run in the wrong precision: inputs of different float types into one elementwise op, and
  in an fp16 graph a sensitive op (LayerNormalization, Softmax, ReduceMean, Pow, Sqrt, Erf...)
  computing in fp16 instead of behind a Cast to fp32.
- ``attribute``: an attribute value the parser refuses (Resize's cubic mode, antialiasing, an
  ``axes`` that is not every axis in order; ArgMax/ArgMin's ``select_last_index``; a TopK whose K is
  computed or not below 3840, TensorRT's TopK limit).
- ``uint8``: a Cast to or from UINT8 whose other side is not FP32 or FP16: TensorRT's UINT8 data type
  converts only to and from float32/float16 (its data-type documentation, 10.3 to 11.4), so
  ``ArgMax -> Cast(UINT8)`` (INT64 indices) does not build; cast through float32 instead.

Which graph is for whom: every graph a build writes records which engines take it
(``engines.graph_purpose``). `lint_purpose` lints a graph only for the targets it is meant for and,
for the others, gives one line naming the graph TensorRT takes from the same build (ONNX Runtime's
uint8 Q/DQ graph is for no TensorRT; the signed fp32 Q/DQ graph only for TensorRT 10's weak typing).

The operator tables are data (``data/onnx_operators.json``), one per target, written from
onnx-tensorrt's published operator lists; the rules above are the tables in this module.

What the ``mtlora-export lint`` command does with this (wired in ``export/``)::

    mtlora-export lint GRAPH.onnx [--target tensorrt-10.3|tensorrt-10.13|tensorrt-11.0|tensorrt-11.5 ...]

lints GRAPH.onnx for each target given (all of ``TARGETS`` when none is) that the graph is meant
for, prints ``format_findings(findings, target)`` (one line per finding: target, node, op, rule,
message) and one line per graph for the targets it is not meant for, and exits 0 when there is no
finding, 1 when there is one or more, `NOT_FOR_TENSORRT_EXIT` (3) when there is none but some graph
is meant for none of the targets; an unreadable graph is an ``EngineError``, shown as one line with
exit 1; an unknown target is click's usage error (exit 2).

Targets are per minor release where the facts differ: 11.0 to 11.4 read opset 24 (``tensorrt-11.0``),
11.5 and later opset 25 (``tensorrt-11.5``).

Only onnx and numpy are needed: this runs on any machine, TensorRT or not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import EngineError

TARGETS = ("tensorrt-10.3", "tensorrt-10.13", "tensorrt-11.0", "tensorrt-11.5")
NOT_FOR_TENSORRT_EXIT = 3  # `mtlora-export lint`: a graph meant for none of the targets (and no finding)
OPERATOR_TABLES = Path(__file__).with_name("data") / "onnx_operators.json"

# onnx.TensorProto element types by TensorRT's name for them (the operator tables' vocabulary).
TYPE_NAMES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
    9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 16: "BF16", 17: "FP8",
    18: "FP8E4M3FNUZ", 19: "FP8E5M2", 20: "FP8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FP4",
}  # fmt: skip
FLOAT_TYPES = frozenset({"FP32", "FP16", "BF16", "DOUBLE"})
STANDARD_DOMAINS = ("", "ai.onnx")

# Which tensors of a node carry the data type the operator tables list: input 0 unless named here
# ("out0" is output 0). Shape-like inputs (Reshape's shape, Resize's sizes, Slice's starts) are
# INT64 by definition and are not what the tables describe.
CHECKED_TENSORS: dict[str, tuple[int | str, ...]] = {
    "Cast": (0, "out0"), "CastLike": (0,), "Constant": ("out0",), "ConstantOfShape": ("out0",),
    "Where": (1, 2), "Concat": ("all",), "Sum": ("all",), "Mean": ("all",), "Max": ("all",),
    "Min": ("all",), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1), "MatMul": (0, 1),
    "Gemm": (0, 1), "QuantizeLinear": (0,), "DequantizeLinear": (0,),
}  # fmt: skip

# Inputs a strongly typed network needs in one type (ONNX lets Pow's exponent differ; TensorRT does not).
SAME_TYPE_INPUTS: dict[str, tuple[int, ...] | str] = {
    "Add": "all", "Sub": "all", "Mul": "all", "Div": "all", "Pow": "all", "Mod": "all",
    "Max": "all", "Min": "all", "Mean": "all", "Sum": "all", "PRelu": "all", "MatMul": "all",
    "Gemm": "all", "Concat": "all", "Equal": "all", "Less": "all", "LessOrEqual": "all",
    "Greater": "all", "GreaterOrEqual": "all", "Where": (1, 2),
}  # fmt: skip

# Control flow and data-dependent shapes: why each is a problem for an engine with one optimisation profile.
DATA_DEPENDENT: dict[str, str] = {
    "If": "control flow: both branches are built and the choice is made per inference",
    "Loop": "control flow: the trip count is a runtime value",
    "Scan": "control flow: TensorRT lowers it to a loop",
    "NonZero": "its output shape depends on the input values",
    "Unique": "its output shape depends on the input values",
    "NonMaxSuppression": "its output shape depends on the input values",
    "Compress": "its output shape depends on the input values",
}

# The ops an fp16 graph keeps in fp32 (calibration.fp16.SENSITIVE_FP16_OPS, which the graph also
# records under FP16_KEPT_OP_TYPES_KEY); a strongly typed network computes them in their input type.
SENSITIVE_FP16_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "Pow", "Sqrt", "Erf", "Gelu")
FP16_KEPT_OP_TYPES_KEY = "mtlora.fp16.kept_op_types"

# Per-channel weight scales must run along the consumer's output channels: (weight input, axis).
WEIGHT_AXIS: dict[str, tuple[int, int | str]] = {
    "Conv": (1, 0), "ConvTranspose": (1, 1), "MatMul": (1, "last"), "Gemm": (1, "gemm"),
}  # fmt: skip

# Attribute values the parser refuses: op -> attribute -> allowed values (absent = ONNX default).
ATTRIBUTE_RULES: dict[str, dict[str, tuple[Any, ...]]] = {
    "Resize": {
        "mode": (b"nearest", b"linear"),
        "coordinate_transformation_mode": (
            b"half_pixel", b"pytorch_half_pixel", b"tf_half_pixel_for_nn", b"asymmetric", b"align_corners",
        ),
        "antialias": (0,),
        "keep_aspect_ratio_policy": (b"stretch",),
    },
    # TensorRT's TopK (which ArgMax/ArgMin become) returns the first index of equal values.
    "ArgMax": {"select_last_index": (0,)},
    "ArgMin": {"select_last_index": (0,)},
}  # fmt: skip

# TensorRT's TopK layer takes K up to this (exclusive), and only as a build-time constant.
TOPK_MAX_K = 3840
# What TensorRT's UINT8 converts to and from (a Cast layer).
UINT8_PARTNERS = frozenset({"FP32", "FP16"})


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT would refuse or mishandle: where (node name, op), which rule, and what to do."""

    node: str
    op: str
    rule: str
    message: str

    def line(self, target: str = "") -> str:
        where = f"{self.node or '<graph>'} ({self.op or '-'})"
        return f"{target + ': ' if target else ''}{where} [{self.rule}] {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "rule": self.rule, "message": self.message}


def format_findings(findings: Iterable[Finding], target: str = "") -> str:
    """One line per finding (empty string when there is none)."""
    return "\n".join(f.line(target) for f in findings)


@cache
def operator_table(target: str) -> dict[str, Any]:
    """The operator table of one target (``data/onnx_operators.json``)."""
    if target not in TARGETS:
        raise EngineError(f"unknown lint target '{target}'; choose one of {', '.join(TARGETS)}")
    return json.loads(OPERATOR_TABLES.read_text())["targets"][target]


def lint_targets(graph, targets: Sequence[str] = TARGETS) -> dict[str, list[Finding]]:
    """`lint_graph` for several targets, loading and typing the graph once."""
    model = _load(graph)
    facts = _GraphFacts(model)
    return {target: _lint(facts, target) for target in targets}


@dataclass(frozen=True)
class PurposeLint:
    """A graph linted for the targets it is meant for (`findings`), and the targets it is not meant for
    (`not_for`) with one line (`note`) saying what the graph is and which graph TensorRT takes instead."""

    graph: str
    findings: dict[str, list[Finding]]
    not_for: tuple[str, ...] = ()
    note: str = ""

    @property
    def count(self) -> int:
        return sum(len(f) for f in self.findings.values())

    def summary(self) -> dict[str, Any]:
        """{target: {"clean", "findings"}} for the linted targets, {"clean": None, "not_for": note} for the rest."""
        verdict = summary(self.findings)
        verdict.update({t: {"clean": None, "findings": [], "not_for": self.note} for t in self.not_for})
        return {t: verdict[t] for t in TARGETS if t in verdict}


def lint_purpose(graph: str | os.PathLike, targets: Sequence[str] = TARGETS) -> PurposeLint:
    """Lint `graph` for those of `targets` its metadata says it is meant for (engines.graph_purpose);
    name, for the others, the graph TensorRT takes from the same build."""
    from engines.graph_purpose import graph_engines, takes_line

    for target in targets:
        operator_table(target)
    model = _load(graph)
    engines = graph_engines(model)
    meant = [t for t in targets if takes_line(engines, operator_table(t)["line"])]
    not_for = tuple(t for t in targets if t not in meant)
    facts = _GraphFacts(model) if meant else None
    findings = {target: _lint(facts, target) for target in meant}
    note = _not_for_note(Path(graph), model, engines, not_for) if not_for else ""
    return PurposeLint(str(graph), findings, not_for, note)


def _not_for_note(graph: Path, model, engines: Sequence[str], not_for: Sequence[str]) -> str:
    from engines.graph_purpose import ENGINES_KEY, GRAPH_KINDS, sibling_graph, tensorrt_takes

    what = GRAPH_KINDS.get(graph.parent.name, "this graph")
    takes = tensorrt_takes(model)
    instead = []
    for line in dict.fromkeys(operator_table(t)["line"] for t in not_for):
        release = line.replace("tensorrt-", "TensorRT ")
        kind = takes.get(line)
        if kind is None:
            instead.append(f"{release} takes the fp32 export or a graph prepared for it "
                           "(calibration.prepare.prepare_graph('tensorrt', ...))")
            continue
        found = sibling_graph(graph, kind)
        instead.append(f"{release} takes {found}" if found is not None else
                       f"{release} takes {GRAPH_KINDS.get(kind, kind)} ({kind}/), which this build did not write "
                       "(mtlora-export build --backend tensorrt --precision int8 writes it)")
    return (f"not meant for {', '.join(not_for)}: {what}, for {', '.join(engines)} ({ENGINES_KEY}); "
            + "; ".join(instead))


def lint_graph(graph: str | os.PathLike | Any, target: str) -> list[Finding]:
    """Findings for an ONNX graph (a path or an onnx.ModelProto) against one of `TARGETS`; [] when clean."""
    operator_table(target)  # an unknown target fails before the graph is read
    return lint_targets(graph, (target,))[target]


# ----------------------------------------------------------------------------- graph facts


def _load(graph):
    if isinstance(graph, (str, os.PathLike)):
        from engines.files import load_onnx

        return load_onnx(graph)
    return graph


class _GraphFacts:
    """What every rule needs, computed once: tensor types, constants, producers and consumers."""

    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
        try:
            typed = onnx.shape_inference.infer_shapes(model)
        except Exception:  # inference can fail on custom ops; the types the model carries remain
            typed = model
        graph = typed.graph
        self.types: dict[str, str] = {}
        self.ranks: dict[str, int] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types[vi.name] = TYPE_NAMES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
        self.constants: dict[str, np.ndarray] = {}
        for init in model.graph.initializer:
            self.types[init.name] = TYPE_NAMES.get(init.data_type, str(init.data_type))
            self.constants[init.name] = numpy_helper.to_array(init)
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
                        self.types[node.output[0]] = TYPE_NAMES.get(attr.t.data_type, str(attr.t.data_type))
        self.nodes = list(model.graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.io = {vi.name for vi in [*model.graph.input, *model.graph.output]}
        meta = {p.key: p.value for p in model.metadata_props}
        kept = json.loads(meta[FP16_KEPT_OP_TYPES_KEY]) if FP16_KEPT_OP_TYPES_KEY in meta else SENSITIVE_FP16_OPS
        self.sensitive_ops = frozenset(kept)
        computes = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
        self.is_fp16_graph = any(
            node.op_type in computes and self.types.get(node.input[0]) == "FP16" for node in self.nodes if node.input
        )

    def type_of(self, name: str) -> str | None:
        return self.types.get(name) if name else None


def _attribute(node, name: str, default=None):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


# ----------------------------------------------------------------------------- rules


def _lint(facts: _GraphFacts, target: str) -> list[Finding]:
    table = operator_table(target)
    findings: list[Finding] = []
    low, high = table["opset"]
    if not low <= facts.opset <= high:
        findings.append(Finding("", "", "opset", f"the graph is opset {facts.opset}; the TensorRT {table['tensorrt']} "
                                f"parser reads opset {low} to {high}; convert it with onnx.version_converter"))
    for node in facts.nodes:
        for rule in _NODE_RULES:
            findings.extend(rule(node, facts, table))
    return findings


def _operator_rule(node, facts, table) -> Iterable[Finding]:
    trt = table["tensorrt"]
    if node.domain not in STANDARD_DOMAINS:
        yield Finding(node.name, f"{node.domain}:{node.op_type}", "operator",
                      f"custom-domain op; TensorRT {trt} would need a plugin for it; export standard ONNX ops instead")
    elif node.op_type not in table["supported"]:
        known = "is not supported by" if node.op_type in table["unsupported"] else "is unknown to"
        yield Finding(node.name, node.op_type, "operator",
                      f"{node.op_type} {known} the TensorRT {trt} ONNX parser; replace it in the export")


def _checked_tensors(node) -> list[tuple[str, str]]:
    """(label, tensor name) of the tensors whose type the operator table constrains."""
    picked = []
    for spec in CHECKED_TENSORS.get(node.op_type, (0,)):
        if spec == "all":
            picked += [(f"input {i}", t) for i, t in enumerate(node.input) if t]
        elif spec == "out0":
            picked += [("output 0", node.output[0])] if node.output else []
        elif spec < len(node.input) and node.input[spec]:
            picked.append((f"input {spec}", node.input[spec]))
    return picked


def _type_rule(node, facts, table) -> Iterable[Finding]:
    allowed = table["supported"].get(node.op_type) if node.domain in STANDARD_DOMAINS else None
    trt = table["tensorrt"]
    if allowed:
        for label, tensor in _checked_tensors(node):
            kind = facts.type_of(tensor)
            if kind and kind not in allowed:
                yield Finding(node.name, node.op_type, "type",
                              f"{label} '{tensor}' is {kind}; TensorRT {trt} takes {node.op_type} on {', '.join(allowed)}")
    for tensor in node.output:
        kind = facts.type_of(tensor)
        if kind == "DOUBLE":
            yield Finding(node.name, node.op_type, "type",
                          f"output '{tensor}' is DOUBLE, which TensorRT clamps to FP32; export in float32")
        elif kind == "UINT8" and tensor not in facts.io and node.op_type != "QuantizeLinear":
            yield Finding(node.name, node.op_type, "type",
                          f"output '{tensor}' is UINT8, which TensorRT takes only as a network input or output")


def _quantization_rule(node, facts, table) -> Iterable[Finding]:
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return
    trt, allowed = table["tensorrt"], table["quantized_types"]
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zero_name = node.input[2] if len(node.input) > 2 else ""
    quantized = _quantized_type(node, facts)
    if quantized not in allowed:
        yield Finding(node.name, node.op_type, "quantization",
                      f"quantizes to {quantized}; TensorRT {trt} takes {', '.join(allowed)} Q/DQ (symmetric int8 for this model)")
    scale = facts.constants.get(scale_name)
    if scale is None:
        yield Finding(node.name, node.op_type, "quantization",
                      f"scale '{scale_name}' is computed; TensorRT needs a constant (initializer) scale")
    elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        yield Finding(node.name, node.op_type, "quantization", f"scale '{scale_name}' has values that are not positive and finite")
    if zero_name:
        zero = facts.constants.get(zero_name)
        if zero is None:
            yield Finding(node.name, node.op_type, "quantization",
                          f"zero point '{zero_name}' is computed; TensorRT needs a constant zero point of 0")
        elif np.any(zero.astype(np.float64) != 0):
            yield Finding(node.name, node.op_type, "quantization",
                          f"zero point '{zero_name}' is not 0 (asymmetric quantization); TensorRT takes symmetric Q/DQ only")
    if scale is not None and scale.size > 1:
        yield from _per_channel(node, facts, scale)
    block = _attribute(node, "block_size", 0)
    if block and quantized != "INT4":
        yield Finding(node.name, node.op_type, "quantization", f"block quantization (block_size={block}) is for INT4 weights only")


def _quantized_type(node, facts) -> str:
    """The low-precision side of a Q or DQ: Q's output, DQ's input (ONNX's default is UINT8)."""
    tensor = node.output[0] if node.op_type == "QuantizeLinear" else node.input[0]
    known = facts.type_of(tensor)
    if known:
        return known
    zero_name = node.input[2] if len(node.input) > 2 else ""
    if zero_name and facts.type_of(zero_name):
        return facts.type_of(zero_name)
    output_dtype = _attribute(node, "output_dtype", 0)
    return TYPE_NAMES.get(output_dtype, "UINT8") if output_dtype else "UINT8"


def _per_channel(node, facts, scale) -> Iterable[Finding]:
    """Per-channel scales are for weights (constants) along the consumer's output-channel axis."""
    weight = _weight_of(node, facts)
    if weight is None:
        yield Finding(node.name, node.op_type, "quantization",
                      f"per-channel scales ({scale.size}) on activation '{node.input[0]}'; TensorRT takes per-tensor activations")
        return
    axis = _attribute(node, "axis", 1)
    rank = weight.ndim
    axis = axis + rank if axis < 0 else axis
    dq = node if node.op_type == "DequantizeLinear" else next(
        (c for c in facts.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
    for consumer in facts.consumers.get(dq.output[0], []) if dq is not None else []:
        slot, expected = WEIGHT_AXIS.get(consumer.op_type, (None, None))
        if slot is None or len(consumer.input) <= slot or consumer.input[slot] != dq.output[0]:
            continue
        if expected == "last":
            expected = rank - 1
        elif expected == "gemm":
            expected = 0 if _attribute(consumer, "transB", 0) else 1
        if axis != expected:
            yield Finding(node.name, node.op_type, "quantization",
                          f"per-channel axis {axis} of weight '{node.input[0]}' is not the output-channel axis "
                          f"{expected} of {consumer.op_type} '{consumer.name}'")
    if weight.ndim and axis < rank and scale.size != weight.shape[axis]:
        yield Finding(node.name, node.op_type, "quantization",
                      f"{scale.size} scales for {weight.shape[axis]} channels on axis {axis} of '{node.input[0]}'")


def _weight_of(node, facts) -> np.ndarray | None:
    """The constant a Q/DQ quantizes: DQ(int8 initializer), Q(float initializer), or DQ(Q(initializer))."""
    x = node.input[0]
    if x in facts.constants:
        return facts.constants[x]
    producer = facts.producer.get(x)
    if node.op_type == "DequantizeLinear" and producer is not None and producer.op_type == "QuantizeLinear":
        return facts.constants.get(producer.input[0])
    return None


def _data_dependent_rule(node, facts, table) -> Iterable[Finding]:
    if node.op_type in DATA_DEPENDENT and node.domain in STANDARD_DOMAINS:
        yield Finding(node.name, node.op_type, "data-dependent",
                      f"{DATA_DEPENDENT[node.op_type]}; keep such constructs out of the exported graph")


def _strong_typing_rule(node, facts, table) -> Iterable[Finding]:
    spec = SAME_TYPE_INPUTS.get(node.op_type)
    if spec is not None:
        indices = range(len(node.input)) if spec == "all" else spec
        kinds = {facts.type_of(node.input[i]) for i in indices if i < len(node.input) and node.input[i]}
        kinds.discard(None)
        if len(kinds) > 1:
            yield Finding(node.name, node.op_type, "strong-typing",
                          f"inputs of different types ({', '.join(sorted(kinds))}); a strongly typed network needs a Cast to one type")
    if facts.is_fp16_graph and node.op_type in facts.sensitive_ops:
        half = [t for t in [*node.input, *node.output] if t and facts.type_of(t) in ("FP16", "BF16")]
        if half:
            yield Finding(node.name, node.op_type, "strong-typing",
                          f"computes in {facts.type_of(half[0])} ({half[0]}) in an fp16 graph; a strongly typed network "
                          f"runs it in that type, so Cast its inputs to FP32 (calibration.fp16 keeps {node.op_type} in fp32)")


def _attribute_rule(node, facts, table) -> Iterable[Finding]:
    for name, allowed in ATTRIBUTE_RULES.get(node.op_type, {}).items():
        value = _attribute(node, name)
        if value is not None and value not in allowed:
            shown = value.decode() if isinstance(value, bytes) else value
            yield Finding(node.name, node.op_type, "attribute",
                          f"{name}={shown} is not supported by TensorRT {table['tensorrt']}")
    if node.op_type == "LayerNormalization" and any(t and facts.consumers.get(t) for t in node.output[1:]):
        yield Finding(node.name, node.op_type, "attribute", "only output Y is supported; Mean and InvStdDev are read here")
    if node.op_type == "Resize":
        yield from _resize_axes(node, facts)
    if node.op_type == "TopK":
        yield from _topk_k(node, facts)


def _resize_axes(node, facts) -> Iterable[Finding]:
    """Resize's `axes` (opset 18): TensorRT resizes with scales or sizes for every axis, in order."""
    axes = _attribute(node, "axes")
    if axes is None:
        return
    rank = facts.ranks.get(node.input[0]) if node.input else None
    axes = list(axes)
    if rank is not None:
        axes = [a + rank if a < 0 else a for a in axes]
    # Rank unknown: 0, 1, ..., n-1 can only be every axis (scales/sizes then cover them all).
    if axes != list(range(rank if rank is not None else len(axes))):
        yield Finding(node.name, node.op_type, "attribute",
                      f"axes={list(_attribute(node, 'axes'))} is not every axis in order; TensorRT resizes all axes: "
                      "give scales or sizes for each axis (1 where nothing changes) and drop axes")


def _topk_k(node, facts) -> Iterable[Finding]:
    k_name = node.input[1] if len(node.input) > 1 else ""
    k = facts.constants.get(k_name)
    if k is None:
        yield Finding(node.name, node.op_type, "attribute",
                      f"K '{k_name}' is computed; TensorRT's TopK needs K as a constant (an initializer)")
    elif k.size != 1 or int(k.reshape(-1)[0]) >= TOPK_MAX_K:
        yield Finding(node.name, node.op_type, "attribute",
                      f"K={k.reshape(-1).tolist()} is not below {TOPK_MAX_K}, TensorRT's TopK limit; reduce K or split the axis")


def _uint8_rule(node, facts, table) -> Iterable[Finding]:
    """UINT8 converts only to and from FP32/FP16 (TensorRT's data-type documentation)."""
    if node.op_type != "Cast" or not node.input or not node.output:
        return
    source, result = facts.type_of(node.input[0]), TYPE_NAMES.get(_attribute(node, "to", 0))
    if result == "UINT8" and source and source not in UINT8_PARTNERS:
        yield Finding(node.name, node.op_type, "uint8",
                      f"casts {source} to UINT8; TensorRT {table['tensorrt']} converts UINT8 only from FP32 or FP16: "
                      "cast to FP32 first (Cast(FLOAT) -> Cast(UINT8))")
    elif source == "UINT8" and result and result not in UINT8_PARTNERS:
        yield Finding(node.name, node.op_type, "uint8",
                      f"casts UINT8 to {result}; TensorRT {table['tensorrt']} converts UINT8 only to FP32 or FP16: "
                      "cast to FP32 first")


_NODE_RULES = (
    _operator_rule,
    _type_rule,
    _quantization_rule,
    _data_dependent_rule,
    _strong_typing_rule,
    _attribute_rule,
    _uint8_rule,
)


def summary(findings_by_target: Mapping[str, list[Finding]]) -> dict[str, Any]:
    """The verdict a build records per graph: {target: {"clean": bool, "findings": [...]}}."""
    return {
        target: {"clean": not findings, "findings": [f.to_dict() for f in findings]}
        for target, findings in findings_by_target.items()
    }
