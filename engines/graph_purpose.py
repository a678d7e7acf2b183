"""Which engines take a graph: recorded in the graph's own metadata by whoever writes it.

A build writes several graphs of one model (the export, the fp16 graph, the signed Q/DQ graph, ONNX
Runtime's uint8 Q/DQ graph, TensorRT's fp16 Q/DQ graph); they look alike from outside, and the
TensorRT lint must not judge ONNX Runtime's variant as if TensorRT were to build it. So each graph
records, under `ENGINES_KEY`, the engines that build from it, and, when TensorRT does not, under
`TENSORRT_TAKES_KEY`, which sibling kind of graph TensorRT takes instead (per release line, because
TensorRT 10's weak typing builds from the fp32 Q/DQ graph and TensorRT 11 only from the fp16 one).

An engine name is a backend ("onnxruntime", "openvino", "tensorrt": every release) or a TensorRT
release line ("tensorrt-10": only TensorRT 10, through its weakly typed builder flags).

A graph without the key (one exported before the key existed, or by someone else) is taken to be
for every engine: the lint judges it as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

ENGINES_KEY = "mtlora.graph.engines"
TENSORRT_TAKES_KEY = "mtlora.graph.tensorrt_takes"
EVERY_ENGINE = ("onnxruntime", "openvino", "tensorrt")

# The prepared graphs' directory names (calibration.prepare) and what each one is, for messages.
GRAPH_KINDS = {
    "fp16": "the fp16 graph",
    "qdq": "the signed fp32 Q/DQ graph",
    "qdq_fp16": "the fp16 Q/DQ graph",
    "qdq_u8": "ONNX Runtime's uint8-activation Q/DQ graph",
}


def purpose_metadata(engines: Sequence[str], tensorrt_takes: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata_props entries that record a graph's purpose."""
    meta = {ENGINES_KEY: json.dumps(list(engines))}
    if tensorrt_takes:
        meta[TENSORRT_TAKES_KEY] = json.dumps(dict(tensorrt_takes), sort_keys=True)
    return meta


def graph_engines(model) -> tuple[str, ...]:
    """The engines that take `model` (an onnx.ModelProto), EVERY_ENGINE when it records none."""
    value = _prop(model, ENGINES_KEY)
    try:
        engines = json.loads(value) if value else None
    except ValueError:
        engines = None
    return tuple(engines) if isinstance(engines, list) and engines else EVERY_ENGINE


def tensorrt_takes(model) -> dict[str, str]:
    """{release line ("tensorrt-10", "tensorrt-11"): graph kind TensorRT takes instead} ({} when not recorded)."""
    value = _prop(model, TENSORRT_TAKES_KEY)
    try:
        takes = json.loads(value) if value else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in takes.items()} if isinstance(takes, dict) else {}


def takes_line(engines: Sequence[str], line: str) -> bool:
    """Whether engines (a graph_engines tuple) include TensorRT release line `line` ("tensorrt-10")."""
    return "tensorrt" in engines or line in engines


def sibling_graph(graph: Path, kind: str) -> Path | None:
    """The graph of `kind` beside `graph` in the same build: ``graphs/<engine>/<kind>/<file>`` for the
    engine directory of `graph` first, then any other engine directory of that build; None when the
    build wrote none."""
    graph = Path(graph)
    if graph.parent.name not in GRAPH_KINDS or len(graph.parents) < 3:
        return None  # not in a build's graphs/<engine>/<kind>/ layout: no siblings to look for
    own = graph.parent.parent / kind / graph.name
    if own.is_file():
        return own
    found = sorted(graph.parents[2].glob(f"*/{kind}/{graph.name}"))
    return found[0] if found else None


def _prop(model, key: str) -> str:
    return next((p.value for p in model.metadata_props if p.key == key), "")
