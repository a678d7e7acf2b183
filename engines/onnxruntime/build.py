"""Build ONNX Runtime engines from a prepared graph: the fp32 ONNX, the fp16 graph, or the Q/DQ int8 graph.

The graph comes prepared (``calibration.prepare.prepare_graph``); this module only checks that it
has the precision asked for. After building we open the engine with the chosen provider and read the
graph ONNX Runtime really runs, so the artifact says what executed: on the CPU provider an fp16
graph's Conv/MatMul have no fp16 kernels and run in fp32 between inserted Casts, and a Q/DQ graph
runs int8 kernels only where ONNX Runtime fused the Q/DQ pairs.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engines.artifact import EngineArtifact
from engines.errors import EngineError
from engines.files import copy_atomic, engine_file, load_onnx, sha256_file, source_metadata
from engines.onnxruntime.runner import _ort, create_session, io_metadata, resolve_providers, session_options
from engines.precision import PRECISIONS
from engines.registry import BACKENDS

INT8_KERNEL_OPS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QGemm",
        "DynamicQuantizeMatMul", "QAttention", "QLinearAdd", "QLinearMul", "QLinearSoftmax",
    }
)  # fmt: skip
FLOAT_COMPUTE_OPS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "NhwcFusedConv"}
)
FLOAT16 = 10  # onnx.TensorProto.FLOAT16
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def build(
    graph_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    precision: str = "fp32",
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    optimize: bool = False,
    providers: str | Sequence[str] | None = None,
    threads: int | None = None,
) -> EngineArtifact:
    """Build `<output_dir>/<name>.<precision>.onnx` and its sidecar from a prepared graph; returns the artifact.

    `graph_path` already has the precision: the fp32 ONNX, the fp16 graph, or the Q/DQ int8 ONNX
    (``calibration.prepare.prepare_graph('onnxruntime', ...)`` makes the last two). `metadata` (the
    prepared graph's) goes into the sidecar. With `optimize`, the file is ORT's optimized graph for
    the first provider (it then only runs with that provider).
    """
    BACKENDS["onnxruntime"].check_precision(precision)
    _ort()
    graph_path = Path(graph_path)
    source = load_onnx(graph_path)
    problem = graph_precision_problem(source, precision)
    if problem:
        raise EngineError(
            f"{graph_path.name} {problem}; prepare it first with "
            f"calibration.prepare.prepare_graph('onnxruntime', onnx_path, work_dir, '{precision}', ...)"
        )
    providers = resolve_providers(providers)
    out = engine_file(graph_path, output_dir, name, precision, ".onnx")
    graph_sha256 = sha256_file(graph_path)
    metadata = {
        **source_metadata(graph_path, graph_sha256, metadata),
        "onnxruntime_version": _ort().__version__,
        "providers": providers,
        "built_from": str(graph_path),
        "built_from_sha256": graph_sha256,
        "opset": next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), None),
    }
    notes: list[str] = []
    copy_atomic(graph_path, out)

    if optimize:
        _write_optimized(out, providers)
        metadata["optimized_for"] = providers[0]
        notes.append(f"graph optimized by onnxruntime for {providers[0]}: run it with that provider only")

    session = create_session(out, providers, session_options(intra_op_threads=threads))
    inputs, outputs = io_metadata(session.get_inputs()), io_metadata(session.get_outputs())
    del session
    executed, kernels, why = executed_precision(out, precision, providers)
    metadata["kernels"] = kernels
    if why:
        notes.append(why)
    artifact = EngineArtifact(
        backend="onnxruntime",
        path=out,
        precision_requested=precision,
        precision_executed=executed,
        device=providers[0],
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        metadata=metadata,
        notes=tuple(notes),
    )
    artifact.save()
    return artifact


def graph_precision_problem(model, precision: str) -> str:
    """Why `model` is not a graph of `precision` ('' when it looks like one): a cheap look, not a check.

    int8 needs QuantizeLinear/DequantizeLinear nodes; fp16 needs float16 weights.
    """
    if PRECISIONS[precision].calibrated and not any(node.op_type in QDQ_OPS for node in model.graph.node):
        return f"has no QuantizeLinear/DequantizeLinear nodes: it is not a Q/DQ {precision} graph"
    if precision == "fp16" and not any(init.data_type == FLOAT16 for init in model.graph.initializer):
        return "has no float16 weights: it is not an fp16 graph"
    return ""


def _write_optimized(path: Path, providers: Sequence[str]) -> None:
    options = session_options(optimization_level="extended")
    with tempfile.TemporaryDirectory(prefix="mtlora-ort-") as tmp:
        optimized = Path(tmp) / path.name
        options.optimized_model_filepath = str(optimized)
        create_session(path, providers, options)
        copy_atomic(optimized, path)


def executed_precision(path: Path, precision: str, providers: Sequence[str]) -> tuple[str, dict[str, int], str]:
    """(precision that runs, kernel counts, explanation when it differs) from the graph ORT executes.

    Only the CPU provider's final graph can be read back; other providers compile nodes away.
    """
    if providers[0] != "CPUExecutionProvider":
        return precision, {}, f"executed precision not verified: {providers[0]} compiles the graph opaquely"
    with tempfile.TemporaryDirectory(prefix="mtlora-ort-") as tmp:
        options = session_options(optimization_level="extended")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        create_session(path, providers, options)
        graph = load_onnx(options.optimized_model_filepath, load_external_data=False).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    ops = Counter(node.op_type for node in graph.node)
    fp16 = sum(1 for n in graph.node if n.op_type in FLOAT_COMPUTE_OPS and types.get(n.input[0]) == FLOAT16)
    fp32 = sum(1 for n in graph.node if n.op_type in FLOAT_COMPUTE_OPS) - fp16
    int8 = sum(count for op, count in ops.items() if op in INT8_KERNEL_OPS)
    kernels = {"int8": int8, "fp16": fp16, "fp32": fp32}
    if precision == "fp16" and fp16 == 0:
        return "fp32", kernels, (
            "the CPU provider has no fp16 Conv/MatMul kernels: onnxruntime casts them to fp32, "
            "so the fp16 graph only rounds weights and activations to fp16 here"
        )
    if PRECISIONS[precision].calibrated and int8 == 0:
        return "fp32", kernels, "onnxruntime fused no Q/DQ pair into an int8 kernel: int8 is only simulated in float"
    if PRECISIONS[precision].source and (fp16 or int8):
        return "mixed", kernels, "the fp32 engine runs fp16/int8 kernels: the source ONNX was not fp32"
    return precision, kernels, ""
