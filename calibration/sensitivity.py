"""Which quantized layers cost accuracy: an int8 graph with chosen layers back in float, and each
layer's local quantization error.

Two kinds of int8 graph, one interface (`QuantizedGraph`):

| graph      | backends              | a layer back in float                              | runs on      |
|------------|-----------------------|----------------------------------------------------|--------------|
| `QdqGraph` | onnxruntime, tensorrt | its DequantizeLinear inputs replaced by the float  | ONNX Runtime |
|            |                       | tensors (the Q's input, the float weight)          | CPU          |
| `NncfGraph`| openvino              | its FakeQuantize inputs bypassed, its float        | OpenVINO     |
|            |                       | weights from the source ONNX                       |              |

Neither recalibrates: the rest of the graph keeps its ranges, so many variants are cheap to try.
The real engine built with `prepare_graph(keep_fp32=names)` recalibrates and is what a build checks.

`local_errors` ranks layers by the error quantization adds at the layer itself: each candidate is
computed twice in one run, once as quantized and once from the float tensors it quantizes
(a shadow copy), and the relative difference of the two outputs is its error. Unlike the error of
the outputs, this does not grow with depth, and an activation whose range one outlier channel
stretches (so every other channel rounds to zero) shows at once.

Torch-free: ONNX Runtime and OpenVINO only, imported when used.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from calibration.errors import CalibrationError
from calibration.fp16 import COMPUTE_OPS
from engines.files import load_onnx
from engines.onnxruntime.exact_int8 import exact_int8

Feed = Mapping[str, np.ndarray]
Infer = Callable[[Feed], dict[str, np.ndarray]]
SHADOW = "__float"  # suffix of a shadow copy's output
SHADOW_CHUNK = 32  # candidates measured per run: bounds the extra outputs held at once


class QuantizedGraph:
    """An int8 graph whose quantized compute layers (`candidates`) can be put back in float."""

    candidates: list[str]
    inputs: list[str]  # the graph's input names

    def runner(self, float_nodes: Iterable[str] = ()) -> Infer:
        """`infer(feed) -> {output name: array}` of the graph with `float_nodes` in float."""
        raise NotImplementedError

    def local_errors(self, feeds: Sequence[Feed]) -> dict[str, float]:
        """Relative error each candidate's output has from quantizing its own inputs, over `feeds`."""
        raise NotImplementedError


def _check_names(graph: QuantizedGraph, names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in graph.candidates]
    if unknown:
        raise CalibrationError(f"not quantized compute layers of this graph: {', '.join(unknown[:5])}")
    return names


class _ErrorMeter:
    def __init__(self):
        self.diff = 0.0
        self.norm = 0.0

    def update(self, quantized: np.ndarray, floating: np.ndarray) -> None:
        q = np.asarray(quantized, np.float64)
        f = np.asarray(floating, np.float64)
        self.diff += float(np.sum((q - f) ** 2))
        self.norm += float(np.sum(f**2))

    def result(self) -> float:
        if not math.isfinite(self.diff):
            return math.inf
        return math.sqrt(self.diff / self.norm) if self.norm > 0 else (0.0 if self.diff == 0 else math.inf)


# ----------------------------------------------------------------------------- Q/DQ ONNX


class QdqGraph(QuantizedGraph):
    """The Q/DQ int8 ONNX (`calibration.qdq`), run with ONNX Runtime's CPU provider.

    `source_onnx`, the fp32 graph it was calibrated from, gives a layer back its exact float weights
    (else the dequantized int8 weights stand in for them).
    """

    def __init__(self, path: str | os.PathLike, *, source_onnx: str | os.PathLike | None = None,
                 threads: int | None = None):
        self.path = Path(path)
        self.model = load_onnx(self.path)
        self.threads = threads
        graph = self.model.graph
        self._producer = {out: n for n in graph.node for out in n.output}
        self._initializers = {i.name: i for i in graph.initializer}
        self._source_weights = {}
        if source_onnx is not None:
            source = load_onnx(source_onnx)
            self._source_weights = {i.name: i for i in source.graph.initializer}
        self.candidates = [n.name for n in graph.node if n.op_type in COMPUTE_OPS and self._dq_inputs(n)]
        self._nodes = {n.name: n for n in graph.node}
        self.inputs = [i.name for i in graph.input if i.name not in self._initializers]

    def _dq_inputs(self, node) -> list[int]:
        return [i for i, t in enumerate(node.input)
                if t in self._producer and self._producer[t].op_type == "DequantizeLinear"]

    def _float_weight(self, dq) -> tuple[str, object]:
        """(name, float TensorProto) for the weight a DequantizeLinear reads."""
        from onnx import numpy_helper

        quantized = dq.input[0]
        original = quantized[: -len("_quantized")] if quantized.endswith("_quantized") else None
        q = numpy_helper.to_array(self._initializers[quantized])
        if original in self._source_weights:
            weight = numpy_helper.to_array(self._source_weights[original])
            if weight.shape == q.shape and weight.dtype == np.float32:
                return f"{quantized}{SHADOW}", numpy_helper.from_array(weight, f"{quantized}{SHADOW}")
        scale = numpy_helper.to_array(self._initializers[dq.input[1]]).astype(np.float32)
        zero = (numpy_helper.to_array(self._initializers[dq.input[2]]).astype(np.float32)
                if len(dq.input) > 2 and dq.input[2] else np.float32(0))
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        weight = ((q.astype(np.float32) - zero) * scale).astype(np.float32)
        return f"{quantized}{SHADOW}", numpy_helper.from_array(weight, f"{quantized}{SHADOW}")

    def _float_inputs(self, node, added: dict) -> list[str]:
        """The node's inputs with every dequantized one replaced by its float source."""
        inputs = list(node.input)
        for i in self._dq_inputs(node):
            dq = self._producer[node.input[i]]
            if dq.input[0] in self._initializers:
                name, tensor = self._float_weight(dq)
                added.setdefault(name, tensor)
                inputs[i] = name
            else:
                q = self._producer.get(dq.input[0])
                if q is None or q.op_type != "QuantizeLinear":
                    raise CalibrationError(f"{self.path.name}: '{node.name}' reads a DequantizeLinear that follows "
                                           "no QuantizeLinear; not a Q/DQ graph from calibration.qdq")
                inputs[i] = q.input[0]
        return inputs

    def variant(self, float_nodes: Iterable[str] = ()):
        """The ModelProto with `float_nodes` in float (unused Q/DQ nodes and weights dropped)."""
        names = _check_names(self, float_nodes)
        model = copy.deepcopy(self.model)
        if not names:
            return model
        added: dict = {}
        rewired = {name: self._float_inputs(self._nodes[name], added) for name in names}
        for node in model.graph.node:
            if node.name in rewired:
                del node.input[:]
                node.input.extend(rewired[node.name])
        model.graph.initializer.extend(added.values())
        _prune(model)
        return model

    def _session(self, model):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        try:
            # As this CPU computes the graph exactly: its U8S8 kernels may saturate (`exact_int8`).
            return ort.InferenceSession(exact_int8(model).SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's own error types
            raise CalibrationError(f"{self.path.name}: ONNX Runtime cannot run the variant: {exc}") from None

    def runner(self, float_nodes: Iterable[str] = ()) -> Infer:
        session = self._session(self.variant(float_nodes))
        names = [o.name for o in session.get_outputs()]

        def infer(feed: Feed) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(None, dict(feed)), strict=True))

        return infer

    def local_errors(self, feeds: Sequence[Feed]) -> dict[str, float]:
        from onnx import helper

        errors: dict[str, float] = {}
        for start in range(0, len(self.candidates), SHADOW_CHUNK):
            chunk = self.candidates[start:start + SHADOW_CHUNK]
            model = copy.deepcopy(self.model)
            added: dict = {}
            pairs = []
            for name in chunk:
                node = self._nodes[name]
                shadow = helper.make_node(node.op_type, self._float_inputs(node, added),
                                          [f"{node.output[0]}{SHADOW}"], name=f"{name}{SHADOW}",
                                          domain=node.domain)
                shadow.attribute.extend(node.attribute)
                model.graph.node.append(shadow)
                pairs.append((name, node.output[0], shadow.output[0]))
            model.graph.initializer.extend(added.values())
            existing = {o.name for o in model.graph.output}
            for _, out, shadow_out in pairs:
                for tensor in (out, shadow_out):
                    if tensor not in existing:
                        model.graph.output.append(helper.make_empty_tensor_value_info(tensor))
            errors.update(shadow_errors(self._session(model), pairs, feeds))
        return errors


def shadow_errors(session, pairs: list[tuple[str, str, str]], feeds) -> dict[str, float]:
    """Each layer's relative error against its float shadow over `feeds`; `pairs` are (layer name, its
    output, the shadow's output), all outputs of `session`."""
    wanted = [t for _, out, shadow_out in pairs for t in (out, shadow_out)]
    meters = {name: _ErrorMeter() for name, _, _ in pairs}
    for feed in feeds:
        values = dict(zip(wanted, session.run(wanted, dict(feed)), strict=True))
        for name, out, shadow_out in pairs:
            meters[name].update(values[out], values[shadow_out])
    return {name: meter.result() for name, meter in meters.items()}


def _prune(model) -> None:
    """Drop nodes whose outputs nothing reads (Q/DQ pairs left behind), then unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {t for n in graph.node for t in n.input} | outputs
        dead = [i for i, n in enumerate(graph.node)
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    read = {t for n in graph.node for t in n.input}
    keep = [i for i in graph.initializer if i.name in read or i.name in outputs]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ----------------------------------------------------------------------------- NNCF (OpenVINO)

_OV_COMPUTE = ("MatMul", "Convolution", "GroupConvolution")
# Ops NNCF moves a quantizer across (it quantizes a Concat's inputs, not its output): a layer's
# activation FakeQuantize may sit behind them.
_OV_TRANSPARENT = ("Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Interpolate", "StridedSlice",
                   "Slice", "Gather", "Split", "VariadicSplit", "MaxPool", "Convert")
_MAX_DEPTH = 8


class NncfGraph(QuantizedGraph):
    """The NNCF-quantized OpenVINO IR (`calibration.nncf_quant`), compiled with `config` on `device`.

    A layer back in float reads its activations from before their FakeQuantize ops, found directly on
    its inputs or behind the ops NNCF moves quantizers across (a Concat's inputs, an Interpolate's);
    that path is copied for the layer alone, so other readers keep their quantizers. NNCF stores only
    int8 weights: with `source_onnx` (the ONNX it quantized) a layer gets its float weights back, else
    it keeps the dequantized int8 ones. Candidates are OpenVINO's friendly names, which
    `prepare_graph(keep_fp32=...)` passes to NNCF's ignored scope.
    """

    def __init__(self, xml: str | os.PathLike, *, source_onnx: str | os.PathLike | None = None,
                 config: Mapping[str, str] | None = None, device: str = "CPU"):
        import openvino as ov

        from engines.openvino.signal_stack import core_with_plugins

        self.xml = Path(xml)
        self.device = device
        self.config = dict(config or {"INFERENCE_PRECISION_HINT": "f32"})
        self._core = core_with_plugins(ov)
        self._factories: dict[str, object] = {}
        self._float_ops = {}
        if source_onnx is not None:
            # NNCF quantized OpenVINO's conversion of this ONNX: same friendly names, the float weights.
            self._float_ops = {op.get_friendly_name(): op for op in ov.convert_model(str(source_onnx)).get_ops()}
        self._weights: dict[str, np.ndarray | None] = {}
        model = self._core.read_model(str(self.xml))
        self.inputs = [p.get_any_name() for p in model.inputs]
        self.candidates = [op.get_friendly_name() for op in model.get_ordered_ops()
                           if op.get_type_name() in _OV_COMPUTE
                           and any(_reaches_fq(v, _MAX_DEPTH) for v in op.input_values())]

    def _create(self, op, sources):
        """A copy of `op` (any opset) reading `sources`."""
        try:
            from openvino.utils.node_factory import NodeFactory
        except ImportError:  # OpenVINO before 2025
            from openvino.runtime.utils.node_factory import NodeFactory

        version = op.get_type_info().version_id
        if version not in self._factories:
            self._factories[version] = NodeFactory(version)
        return self._factories[version].create(op.get_type_name(), list(sources), op.get_attributes())

    def _float_value(self, value, depth: int = _MAX_DEPTH):
        node = value.get_node()
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            # Past it too: NNCF unifies the scales of a Concat's inputs and moves them further up (before an
            # Interpolate), so ignoring the layer drops that whole chain of quantizers.
            source = node.input_value(0)
            return self._float_value(source, depth - 1) if depth > 0 else self._detached(source)
        if depth == 0 or kind not in _OV_TRANSPARENT or not _reaches_fq(value, depth):
            return self._detached(value)
        copy_ = self._create(node, [self._float_value(v, depth - 1) for v in node.input_values()])
        return copy_.output(value.get_index())

    def _detached(self, value):
        """`value`, or the same output of a copy of its op when a FakeQuantize also reads it: OpenVINO's CPU
        plugin fuses that FakeQuantize into the op (a Convolution's post-op), and another reader of the
        fused output does not get the float values."""
        node = value.get_node()
        if node.get_type_name() in ("Parameter", "Constant") or not any(
                t.get_node().get_type_name() == "FakeQuantize" for t in value.get_target_inputs()):
            return value
        return self._create(node, [_own_constant(v) for v in node.input_values()]).output(value.get_index())

    def _float_weight(self, op) -> np.ndarray | None:
        """The layer's float weight in the quantized model's terms, or None when it cannot be had.

        NNCF keeps int8 weights only; the float ones come from the source model, divided by SmoothQuant's
        per-channel factor where NNCF moved one onto the activation (a Multiply before its FakeQuantize).
        Checked against the int8 weight: a value that does not match it is not used."""
        name = op.get_friendly_name()
        if name in self._weights:
            return self._weights[name]
        weight = None
        source = self._float_ops.get(name)
        quantized = _constant_value(op.input_value(1))
        original = _constant_value(source.input_value(1)) if source is not None else None
        if quantized is not None and original is not None and original.shape == quantized.shape:
            factor = _smooth_factor(op.input_value(0))
            axis = 1 if op.get_type_name() != "MatMul" else (-1 if op.get_attributes()["transpose_b"] else -2)
            tries = [original]
            if factor is not None and factor.size == original.shape[axis]:
                shape = [1] * original.ndim
                shape[axis] = -1
                tries = [original / factor.reshape(shape), original * factor.reshape(shape)]
            norm = float(np.linalg.norm(quantized)) or 1.0
            for candidate in tries:
                if float(np.linalg.norm(candidate - quantized)) / norm < 0.25:
                    weight = candidate.astype(np.float32)
                    break
        self._weights[name] = weight
        return weight

    def _float_sources(self, op) -> list:
        import openvino.opset13 as ops

        sources = [self._float_value(v) for v in op.input_values()]
        weight = self._float_weight(op)
        if weight is not None:
            sources[1] = ops.constant(weight).output(0)
        return sources

    def variant(self, float_nodes: Iterable[str] = ()):
        names = set(_check_names(self, float_nodes))
        model = self._core.read_model(str(self.xml))
        for op in model.get_ordered_ops():
            if op.get_friendly_name() in names:
                for i, source in enumerate(self._float_sources(op)):
                    op.input(i).replace_source_output(source)
        model.validate_nodes_and_infer_types()
        return model

    def _compile(self, model):
        try:
            return self._core.compile_model(model, self.device, self.config)
        except Exception as exc:
            raise CalibrationError(f"{self.xml.name}: OpenVINO cannot compile the variant: {exc}") from None

    def runner(self, float_nodes: Iterable[str] = ()) -> Infer:
        compiled = self._compile(self.variant(float_nodes))
        request = compiled.create_infer_request()
        names = [port.get_any_name() for port in compiled.outputs]

        def infer(feed: Feed) -> dict[str, np.ndarray]:
            results = request.infer(dict(feed))
            return {name: np.array(results[port], copy=True) for name, port in zip(names, compiled.outputs, strict=True)}

        return infer

    def local_errors(self, feeds: Sequence[Feed]) -> dict[str, float]:
        errors: dict[str, float] = {}
        for start in range(0, len(self.candidates), SHADOW_CHUNK):
            chunk = set(self.candidates[start:start + SHADOW_CHUNK])
            model = self._core.read_model(str(self.xml))
            pairs = []
            for k, op in enumerate(model.get_ordered_ops()):
                name = op.get_friendly_name()
                if name in chunk:
                    # Two copies, so the model's own ops keep their outputs to themselves: exposing an
                    # output that feeds a FakeQuantize changes what OpenVINO's CPU plugin fuses there.
                    quantized = self._create(op, [_own_constant(v) for v in op.input_values()])
                    shadow = self._create(op, [_own_constant(v) for v in self._float_sources(op)])
                    # Outputs are found again by tensor name: a compiled model may order them its own way.
                    quantized_name, float_name = f"mtlora.q.{k}", f"mtlora.q.{k}{SHADOW}"
                    quantized.output(0).get_tensor().set_names({quantized_name})
                    shadow.output(0).get_tensor().set_names({float_name})
                    model.add_outputs([quantized.output(0), shadow.output(0)])
                    pairs.append((name, quantized_name, float_name))
            compiled = self._compile(model)
            request = compiled.create_infer_request()
            ports = {n: compiled.output(n) for _, q, f in pairs for n in (q, f)}
            meters = {name: _ErrorMeter() for name, _, _ in pairs}
            for feed in feeds:
                results = request.infer(dict(feed))
                for name, q, f in pairs:
                    meters[name].update(results[ports[q]], results[ports[f]])
            errors.update({name: meter.result() for name, meter in meters.items()})
        return errors


_CONSTANT_OPS = {"Multiply": np.multiply, "Subtract": np.subtract, "Add": np.add, "Divide": np.divide}


def _constant_value(value) -> np.ndarray | None:
    """The value of a weight's decompression (int8 Constant -> Convert -> Subtract -> Multiply), or None."""
    node = value.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return np.asarray(node.get_data())
    if kind == "Convert":
        data = _constant_value(node.input_value(0))
        return None if data is None else data.astype(node.get_output_element_type(0).to_dtype())
    if kind in _CONSTANT_OPS:
        a, b = (_constant_value(v) for v in node.input_values())
        return None if a is None or b is None else _CONSTANT_OPS[kind](a, b)
    return None


def _smooth_factor(value) -> np.ndarray | None:
    """The per-channel constant of the SmoothQuant Multiply NNCF put before a layer's activation quantizer."""
    node = value.get_node()
    for _ in range(_MAX_DEPTH):
        kind = node.get_type_name()
        if kind == "Multiply" and "smooth_quant" in node.get_friendly_name():
            factors = [_constant_value(v) for v in node.input_values()]
            factor = next((f for f in factors if f is not None), None)
            return None if factor is None else factor.reshape(-1)
        if kind not in ("FakeQuantize", *_OV_TRANSPARENT):
            return None
        node = node.input_value(0).get_node()
    return None


def _own_constant(value):
    """A layer copy's input: a weight as a Constant of its own (a decompression subgraph shared with the
    model's layer would change how OpenVINO's CPU plugin compiles that layer), anything else as it is."""
    import openvino.opset13 as ops

    if value.get_node().get_type_name() == "Constant":
        return value
    data = _constant_value(value)
    return value if data is None else ops.constant(np.ascontiguousarray(data)).output(0)


def _reaches_fq(value, depth: int) -> bool:
    """Whether a FakeQuantize produces `value`, directly or through transparent ops."""
    node = value.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if depth == 0 or kind not in _OV_TRANSPARENT:
        return False
    return any(_reaches_fq(v, depth - 1) for v in node.input_values())


# ----------------------------------------------------------------------------- the table

# Which quantized graph a backend's int8 engine is built from, and so which graph the search edits.
GRAPH_KINDS = {"onnxruntime": "qdq", "tensorrt": "qdq", "openvino": "nncf"}


def open_quantized_graph(backend: str, prepared_path: str | os.PathLike, metadata: Mapping, *,
                         threads: int | None = None, config: Mapping[str, str] | None = None) -> QuantizedGraph:
    """The quantized graph behind a backend's int8 engine, from `prepare_graph`'s result (path, metadata).

    TensorRT's int8 graph is the fp16 Q/DQ graph; its layers are judged on the fp32 Q/DQ graph it was made
    from (ONNX Runtime runs that here, with no GPU), as they share every Q/DQ pair.
    """
    kind = GRAPH_KINDS.get(backend)
    if kind is None:
        raise CalibrationError(f"no int8 layer search for backend '{backend}'; it works for {', '.join(GRAPH_KINDS)}")
    if kind == "nncf":
        config = dict(config or {"INFERENCE_PRECISION_HINT": "f32"})
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        return NncfGraph(prepared_path, source_onnx=metadata.get("source_onnx"), config=config)
    try:
        import onnxruntime  # noqa: F401 - the Q/DQ graph's variants run on its CPU provider
    except ImportError:
        raise CalibrationError("the int8 layer search runs the Q/DQ graph with ONNX Runtime, which is not "
                               "installed here; install it, or keep layers in fp32 with --keep-fp32") from None
    path = metadata.get("qdq_fp32_onnx") or prepared_path
    return QdqGraph(path, source_onnx=metadata.get("source_onnx"), threads=threads)
