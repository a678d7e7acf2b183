"""Which fp16 layers cost accuracy: the fp16 graph (`calibration.fp16`) with chosen layers in fp32, and each
layer's local fp16 error; the 16-bit counterpart of `calibration.sensitivity`'s int8 graphs, with the same
interface (`candidates`, `inputs`, `runner(float_nodes)`, `local_errors(feeds)`).

A variant is the fp16 graph converted again with the layers among its `keep_fp32` nodes: exactly the graph
`prepare_graph(keep_fp32=...)` gives ONNX Runtime's (and TensorRT's) fp16 engine, run with ONNX Runtime's
CPU provider.

`local_errors` measures, in one run, what running each fp16 compute layer in fp16 adds at the layer
itself: beside each one a shadow copy computes in fp32 from the same (fp16) inputs and the float weights,
and the relative difference of the two outputs is its error. A layer whose output overflows fp16, or
whose weights fall below fp16's normal range, stands out; otherwise every layer adds about fp16's rounding
(2^-11), and the ranking tells little (`export.pipeline.layer_search.is_informative` decides).

Torch-free: ONNX and ONNX Runtime only, imported when used.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from calibration.errors import CalibrationError
from calibration.fp16 import COMPUTE_OPS, FLOAT, FLOAT16, KEPT_NODES_KEY, to_fp16_graph
from calibration.sensitivity import SHADOW, SHADOW_CHUNK, Feed, Infer, QuantizedGraph, shadow_errors
from engines.files import load_onnx


def node_glob(name: str) -> str:
    """A `keep_fp32` glob that matches the node `name` and nothing else."""
    return glob.escape(name)


class Fp16Graph(QuantizedGraph):
    """The fp16 graph of `source_onnx` with `keep_fp32` (the build's globs) in fp32; its candidates are the
    compute layers (Conv, MatMul, Gemm) that run in fp16 there."""

    def __init__(self, source_onnx: str | os.PathLike, *, keep_fp32: Sequence[str] = (), threads: int | None = None):
        import json

        self.source = Path(source_onnx)
        self.keep_fp32 = tuple(keep_fp32)
        self.threads = threads
        self._work = tempfile.TemporaryDirectory(prefix="mtlora-fp16-probe-")
        self.path = self._convert(())
        self.model = load_onnx(self.path)
        recorded = next((p.value for p in self.model.metadata_props if p.key == KEPT_NODES_KEY), "[]")
        kept = set(json.loads(recorded))
        self._nodes = {n.name: n for n in self.model.graph.node}
        initializers = {i.name for i in self.model.graph.initializer}
        self.candidates = [n.name for n in self.model.graph.node if n.op_type in COMPUTE_OPS and n.name not in kept]
        self.inputs = [i.name for i in self.model.graph.input if i.name not in initializers]

    def close(self) -> None:
        self._work.cleanup()

    def _convert(self, float_nodes: Iterable[str]) -> Path:
        nodes = list(float_nodes)
        out = Path(self._work.name) / f"variant-{len(nodes)}-{abs(hash(tuple(sorted(nodes))))}.onnx"
        return to_fp16_graph(self.source, out, keep_fp32=[*self.keep_fp32, *map(node_glob, nodes)])

    def _session(self, model_bytes: bytes):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        try:
            return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's own error types
            raise CalibrationError(f"{self.source.name}: ONNX Runtime cannot run the fp16 variant: {exc}") from None

    def runner(self, float_nodes: Iterable[str] = ()) -> Infer:
        names = list(dict.fromkeys(float_nodes))
        unknown = [n for n in names if n not in self.candidates]
        if unknown:
            raise CalibrationError(f"not fp16 compute layers of this graph: {', '.join(unknown[:5])}")
        path = self._convert(names)
        session = self._session(path.read_bytes())
        path.unlink(missing_ok=True)
        outputs = [o.name for o in session.get_outputs()]

        def infer(feed: Feed) -> dict[str, np.ndarray]:
            return dict(zip(outputs, session.run(None, dict(feed)), strict=True))

        return infer

    def local_errors(self, feeds: Sequence[Feed]) -> dict[str, float]:
        import copy

        from onnx import helper, numpy_helper

        source_weights = {i.name: i for i in load_onnx(self.source).graph.initializer}
        initializers = {i.name: i for i in self.model.graph.initializer}
        errors: dict[str, float] = {}
        for start in range(0, len(self.candidates), SHADOW_CHUNK):
            chunk = self.candidates[start:start + SHADOW_CHUNK]
            model = copy.deepcopy(self.model)
            added: dict = {}
            pairs = []
            for k, name in enumerate(chunk):
                node = self._nodes[name]
                inputs = []
                for i, tensor in enumerate(node.input):
                    if not tensor:
                        inputs.append(tensor)
                    elif tensor in initializers:
                        # The float weight, from the fp32 graph (the converter keeps initializer names).
                        weight = source_weights.get(tensor)
                        value = (numpy_helper.to_array(weight) if weight is not None and weight.data_type == FLOAT
                                 else numpy_helper.to_array(initializers[tensor]).astype(np.float32))
                        shadow_name = f"{tensor}{SHADOW}"
                        added.setdefault(shadow_name, numpy_helper.from_array(value.astype(np.float32), shadow_name))
                        inputs.append(shadow_name)
                    else:
                        as_float = f"{name}.in{i}{SHADOW}"
                        model.graph.node.append(helper.make_node("Cast", [tensor], [as_float], to=FLOAT,
                                                                 name=f"{name}.cast{i}{SHADOW}"))
                        inputs.append(as_float)
                shadow = helper.make_node(node.op_type, inputs, [f"mtlora.f.{start + k}{SHADOW}"],
                                          name=f"{name}{SHADOW}", domain=node.domain)
                shadow.attribute.extend(node.attribute)
                model.graph.node.append(shadow)
                # The fp16 side as float32, so both outputs are read the same way.
                as_float = f"mtlora.f.{start + k}"
                model.graph.node.append(helper.make_node("Cast", [node.output[0]], [as_float], to=FLOAT,
                                                         name=f"{name}.out{SHADOW}"))
                pairs.append((name, as_float, shadow.output[0]))
            model.graph.initializer.extend(added.values())
            for _, half, full in pairs:
                model.graph.output.extend([helper.make_tensor_value_info(half, FLOAT, None),
                                           helper.make_tensor_value_info(full, FLOAT, None)])
            errors.update(shadow_errors(self._session(model.SerializeToString()), pairs, feeds))
        return errors


__all__ = ["FLOAT16", "Fp16Graph", "node_glob"]
