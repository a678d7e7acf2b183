"""Keep chosen ONNX nodes in fp32 while OpenVINO runs the rest of a model in bf16 or f16.

The CPU plugin leaves an op in its original precision when the op carries the runtime attribute
``DisablePrecisionConversion`` (what ``ov::disable_fp16_compression`` sets; the IR's older ``precise``
attribute maps to it). Python cannot set that attribute (an RTMap takes only strings and integers, which
the plugin does not recognise), but the IR reader builds it from ``<rt_info>``: so the model is saved as
IR, the attribute is written into the XML of the ops to keep and of their weights, and the IR is read
back. ``compress_to_fp16`` then leaves the marked weights in fp32 too.

What the CPU plugin of OpenVINO 2026.4 does with the mark (tiny MTL model, every op marked, on a CPU with
AMX):

- f16 inference: every marked op ran f32 (Convolution, FullyConnected, MatMul, MVN, Softmax, Eltwise,
  Interpolate, Transpose, Reshape, Split).
- bf16 inference: Convolution, MVN, Eltwise, Reshape, Transpose and a bias-free FullyConnected ran f32;
  a FullyConnected with a bias (a Linear layer: MatMul + Add, fused by the plugin, which drops the mark),
  Interpolate, and the ops the plugin builds itself (snippets Subgraphs, attention's MatMul/Softmax,
  Split from Slices) still ran bf16.

So the mark is a request, and `prove_kept` reads the compiled model's runtime graph to say which kept
nodes really ran f32. ONNX node names are mapped to OpenVINO ops by their output tensor names, which the
ONNX frontend keeps (`ops_of_onnx_nodes`).
"""

from __future__ import annotations

import json
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engines.errors import EngineError

# The IR form of DisablePrecisionConversion: conversion to f16 disabled (the CPU plugin reads the same
# mark for bf16). "f32:bf16" is ignored by the plugin.
MARK = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
MARK_KEY = "DisablePrecisionConversion_0"  # its key in an op's rt_info once read from IR
# Where the IR records which ONNX nodes were kept and the OpenVINO ops that compute them.
RECORD_PATH = ["mtlora", "kept_fp32"]
REDUCED = ("bf16", "f16")
# Runtime-graph layer types that only move or convert data between the ops we ask about.
_GLUE_LAYERS = ("Reorder", "Convert", "Input", "Output", "Const")
_MAX_FUSION_DEPTH = 8


# ----------------------------------------------------------------------------- ONNX node -> OpenVINO ops


def ops_of_onnx_nodes(model, onnx_model, names: Iterable[str]) -> dict[str, list[str]]:
    """The friendly names of the OpenVINO ops (of `model`, converted from `onnx_model`) that compute each
    named ONNX node; an EngineError names the ONNX nodes that do not exist.

    An ONNX node's ops are the producers of its output tensors (the frontend keeps ONNX tensor names)
    and the unnamed data-path ops behind them (a Conv is Convolution + bias Add, a LayerNormalization
    MVN + Multiply + Add). A node whose outputs vanished was fused into a later op (Erf into Gelu): its
    ops are those of the first consumers whose outputs survive. A node that computes nothing at run
    time (shape arithmetic folded into constants) maps to no op.
    """
    names = list(dict.fromkeys(names))
    nodes = {node.name: node for node in onnx_model.graph.node if node.name}
    unknown = [n for n in names if n not in nodes]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise EngineError(
            f"no ONNX node named {shown} in the model; keep_fp32 takes node names of this ONNX "
            "(expand globs with calibration.fp16.match_nodes first)"
        )
    producer = {name: op for op in model.get_ops() for out in op.outputs() for name in out.get_names()}
    consumers: dict[str, list] = {}
    for node in onnx_model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    data_ops = _data_path_ops(model)
    onnx_data = _onnx_data_path(onnx_model)
    mapping = {}
    for name in names:
        node = nodes[name]
        # Only a node on the data path can have been fused into a later op; weights and shape
        # arithmetic whose outputs vanished were folded into constants.
        ops = _surviving_producers(node, producer, consumers, follow=node.name in onnx_data)
        found: dict[str, Any] = {}
        for op in ops:
            for inner in _unnamed_inputs(op, data_ops):
                found.setdefault(inner.get_friendly_name(), inner)
        mapping[name] = sorted(n for n, op in found.items() if op.get_type_name() != "Constant")
    return mapping


def _onnx_data_path(onnx_model) -> set[str]:
    """Names of the ONNX nodes that compute on the graph inputs' values (not on weights, not on shapes)."""
    reached = {i.name for i in onnx_model.graph.input}
    names = set()
    for node in onnx_model.graph.node:  # ONNX nodes are topologically sorted
        if node.op_type != "Shape" and any(t in reached for t in node.input):
            names.add(node.name)
            reached.update(node.output)
    return names


def _surviving_producers(node, producer, consumers, *, follow: bool = True) -> list:
    """The ops producing `node`'s outputs, or where they vanished (and `follow`), those of its nearest
    consumers whose outputs survive."""
    frontier, seen = [node], {node.name}
    for _ in range(_MAX_FUSION_DEPTH):
        ops = {op.get_name(): op for n in frontier for t in n.output if (op := producer.get(t)) is not None}
        if ops or not follow:
            return list(ops.values())
        following = []
        for n in frontier:
            for t in n.output:
                for c in consumers.get(t, []):
                    if c.name not in seen:
                        seen.add(c.name)
                        following.append(c)
        if not following:
            return []
        frontier = following
    return []


def _data_path_ops(model) -> set[str]:
    """Unique names (`get_name`) of the ops that depend on a model input (not weights or folded constants)."""
    reached: set[str] = set()
    stack = list(model.get_parameters())
    while stack:
        op = stack.pop()
        if op.get_name() in reached:
            continue
        reached.add(op.get_name())
        for out in op.outputs():
            stack.extend(target.get_node() for target in out.get_target_inputs())
    return reached


def _unnamed_inputs(op, data_ops: set[str]) -> list:
    """`op` and the ops behind it whose outputs have no tensor name: parts of the same ONNX node."""
    found: dict[str, Any] = {}
    stack = [op]
    while stack:
        current = stack.pop()
        if current.get_name() in found:
            continue
        found[current.get_name()] = current
        for source in (i.get_source_output() for i in current.inputs()):
            parent = source.get_node()
            kind = parent.get_type_name()
            if kind not in ("Parameter", "Constant") and parent.get_name() in data_ops and not source.get_names():
                stack.append(parent)
    return list(found.values())


def _weights_of(model, op_names: set[str]) -> set[str]:
    """Friendly names of the Constants (and the unnamed constant ops in between: Transpose, Convert)
    that feed the named ops: marked too, so fp16 compression leaves them fp32."""
    data_ops = _data_path_ops(model)
    found: set[str] = set()
    for op in model.get_ops():
        if op.get_friendly_name() not in op_names:
            continue
        stack = [i.get_source_output().get_node() for i in op.inputs()]
        while stack:
            parent = stack.pop()
            if parent.get_name() in data_ops or parent.get_friendly_name() in found:
                continue
            found.add(parent.get_friendly_name())
            stack.extend(i.get_source_output().get_node() for i in parent.inputs())
    return found


def _results_of(model, op_names: set[str]) -> set[str]:
    """Friendly names of the Results that the named ops feed: unmarked, f16 inference would round a kept
    output layer's values to f16 on the way out (a Convert before the Result)."""
    return {
        result.get_friendly_name()
        for result in model.get_results()
        if result.input(0).get_source_output().get_node().get_friendly_name() in op_names
    }


# ----------------------------------------------------------------------------- marking


def mark_kept(core, model, kept: Mapping[str, Sequence[str]], work_dir: str | Path):
    """`model` with the ops of `kept` ({ONNX node: [OpenVINO op names]}) and their weights marked to stay
    fp32, and `kept` recorded in the model (`kept_record`): saved as IR into a temporary folder under
    `work_dir`, marked in the XML, read back. The returned model holds the marks as the plugin reads them.
    The Results those ops feed are marked too (`_results_of`)."""
    import openvino as ov

    ops = {name for names in kept.values() for name in names}
    marked = ops | _weights_of(model, ops) | _results_of(model, ops)
    model.set_rt_info(json.dumps(dict(kept)), RECORD_PATH)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".keep-", dir=work_dir) as tmp:
        xml = Path(tmp) / "marked.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        tree = ET.parse(xml)
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") in marked:
                rt_info = layer.find("rt_info")
                if rt_info is None:
                    rt_info = ET.SubElement(layer, "rt_info")
                if not any(a.get("name") == MARK["name"] for a in rt_info.iter("attribute")):
                    ET.SubElement(rt_info, "attribute", MARK)
        tree.write(xml, encoding="utf-8", xml_declaration=True)
        try:
            # Weights are read into memory, not mapped from the file about to be removed.
            return core.read_model(str(xml), config={"ENABLE_MMAP": False})
        except Exception as exc:
            raise EngineError(f"OpenVINO could not read back the IR with the fp32 marks: {exc}") from exc


def kept_record(model) -> dict[str, list[str]]:
    """{ONNX node: [OpenVINO op names]} that `mark_kept` recorded in the model ({} when none)."""
    if not model.has_rt_info(RECORD_PATH):
        return {}
    value = model.get_rt_info(RECORD_PATH)
    return json.loads(value.astype(str) if hasattr(value, "astype") else str(value))


def marked_ops(model) -> list[str]:
    """Friendly names of the ops that carry the fp32 mark."""
    return [op.get_friendly_name() for op in model.get_ops() if MARK_KEY in op.get_rt_info()]


# ----------------------------------------------------------------------------- proof


def runtime_layers(compiled) -> list[dict[str, Any]]:
    """The executed graph's layers: name, type, runtime precision, kernel and the model ops in each."""
    layers = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer_type = _rt_text(info, "layerType") or op.get_type_name()
        if layer_type in _GLUE_LAYERS:
            continue
        layers.append({
            "name": op.get_friendly_name(),
            "layer_type": layer_type,
            "precision": _rt_text(info, "runtimePrecision"),
            "kernel": _rt_text(info, "primitiveType"),
            "original": [n for n in _rt_text(info, "originalLayersNames").split(",") if n],
        })
    return layers


def _rt_text(info, key: str) -> str:
    return info[key].astype(str) if key in info else ""


def ran_reduced(layer: Mapping[str, Any]) -> bool:
    """Whether a runtime layer computed in bf16/f16: its runtime precision or its kernel says so."""
    kernel = str(layer.get("kernel", ""))
    return layer.get("precision") in REDUCED or any(kernel.endswith(f"_{p}") for p in REDUCED)


def prove_kept(compiled, model, kept: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """What really ran for each kept ONNX node, from the compiled model's runtime graph.

    A node ran f32 when none of the runtime layers holding its ops computed in bf16/f16. Ops the plugin
    fused away (a MatMul into the FullyConnected named after its bias Add) are looked up at the nearest
    consumer that survives. Returns {"asked", "ran_f32", "not_f32": {node: [layers]}, "not_executed",
    "layer_types": {type: {precision: count}}}.
    """
    layers = runtime_layers(compiled)
    by_op: dict[str, list[dict]] = {}
    for layer in layers:
        for original in layer["original"]:
            by_op.setdefault(original, []).append(layer)
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    ran_f32, not_f32, not_executed = [], {}, []
    layer_types: dict[str, dict[str, int]] = {}
    for node, op_names in kept.items():
        held = {}
        for name in op_names:
            for layer in by_op.get(name) or _fused_into(ops.get(name), by_op):
                held[layer["name"]] = layer
        if not held:
            not_executed.append(node)
            continue
        reduced = [layer for layer in held.values() if ran_reduced(layer)]
        for layer in held.values():
            precision = "reduced" if ran_reduced(layer) else "f32"
            counts = layer_types.setdefault(layer["layer_type"], {})
            counts[precision] = counts.get(precision, 0) + 1
        if reduced:
            not_f32[node] = [{k: layer[k] for k in ("name", "layer_type", "precision", "kernel")} for layer in reduced]
        else:
            ran_f32.append(node)
    return {
        "asked": list(kept),
        "ran_f32": ran_f32,
        "not_f32": not_f32,
        "not_executed": not_executed,
        "layer_types": layer_types,
    }


def _fused_into(op, by_op: Mapping[str, list]) -> list:
    """Runtime layers of the nearest consumers of `op` that appear in the runtime graph."""
    if op is None:
        return []
    frontier = [op]
    for _ in range(_MAX_FUSION_DEPTH):
        following = [t.get_node() for o in frontier for out in o.outputs() for t in out.get_target_inputs()]
        hits = [layer for f in following for layer in by_op.get(f.get_friendly_name(), [])]
        if hits or not following:
            return hits
        frontier = following
    return []


def kept_note(proof: Mapping[str, Any], hint: str, device: str) -> str:
    """One line on the kept nodes the device did not run in f32 ('' when all did)."""
    not_f32 = proof["not_f32"]
    if not not_f32:
        return ""
    types = sorted({layer["layer_type"] for layers in not_f32.values() for layer in layers})
    shown = ", ".join(list(not_f32)[:3]) + (" ..." if len(not_f32) > 3 else "")
    return (
        f"{len(not_f32)} of {len(proof['asked'])} kept node(s) still ran {hint} on {device} ({shown}; "
        f"{', '.join(types)}): OpenVINO's CPU plugin does not keep those layer types in fp32 at {hint}"
    )
