"""Build TensorRT plans (TensorRT 10 and 11) from a prepared ONNX graph.

The graph comes prepared (``calibration.prepare.prepare_graph('tensorrt', ...)``): the fp32 ONNX, the
fp16 graph (explicit Casts, sensitive ops in fp32) or the Q/DQ int8 graph. Precision is decided by
feature detection, not by version numbers:

- strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists): the graph's types are
  the precision: fp16 builds the fp16 graph, int8 the Q/DQ graph. TensorRT 11 knows nothing else.
- weakly typed (``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` exist, TensorRT 10): the FP16 flag on the
  fp32 ONNX (``typing='weak'`` takes it as is) or on the fp16 graph, or the INT8 flag on the Q/DQ
  graph; TensorRT picks each layer's precision.

fp32 engines clear TF32 so "fp32" means fp32. Polygraphy's loaders do the building when installed;
otherwise the same steps run on the raw TensorRT API. Nothing here runs without an NVIDIA GPU.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.artifact import EngineArtifact, onnx_io_metadata
from engines.errors import EngineError
from engines.files import engine_file, load_onnx, sha256_file, source_metadata, write_atomic
from engines.registry import BACKENDS
from engines.tensorrt.runner import _polygraphy_trt, _trt, cuda_api

TYPINGS = ("auto", "strong", "weak")
FLOAT16 = 10  # onnx.TensorProto.FLOAT16
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def trt_features(trt) -> dict[str, Any]:
    """What this TensorRT offers, by feature detection."""
    return {
        "version": trt.__version__,
        "strongly_typed": hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
        "fp16_flag": hasattr(trt.BuilderFlag, "FP16"),
        "int8_flag": hasattr(trt.BuilderFlag, "INT8"),
        "tf32_flag": hasattr(trt.BuilderFlag, "TF32"),
    }


def plan_precision(precision: str, features: Mapping[str, Any], typing: str = "auto") -> dict[str, Any]:
    """How to build `precision` with these features: which graph ('source', 'fp16', 'qdq'), whether
    the network is strongly typed, and which builder flags to set. Pure, so it is testable anywhere."""
    if typing not in TYPINGS:
        raise EngineError(f"unknown typing '{typing}'; choose one of {', '.join(TYPINGS)}")
    strong_ok = bool(features.get("strongly_typed"))
    if typing == "strong" and not strong_ok:
        raise EngineError(f"TensorRT {features.get('version')} has no strongly typed networks; use typing='weak'")
    if precision == "fp32":
        return {"graph": "source", "strongly_typed": strong_ok, "flags": [], "clear_tf32": bool(features.get("tf32_flag"))}
    if precision not in ("fp16", "int8"):
        raise EngineError(f"tensorrt cannot build precision '{precision}'; choose one of fp32, fp16, int8")
    flag = "fp16_flag" if precision == "fp16" else "int8_flag"
    weak_ok = bool(features.get(flag))
    if typing == "weak" and not weak_ok:
        raise EngineError(
            f"TensorRT {features.get('version')} has no BuilderFlag.{precision.upper()} (weak typing was removed "
            "in TensorRT 11); use typing='strong' or 'auto'"
        )
    strong = typing == "strong" or (typing == "auto" and strong_ok)
    if not strong and not weak_ok:
        raise EngineError(f"TensorRT {features.get('version')} can build {precision} neither strongly nor weakly typed")
    graph = "fp16" if precision == "fp16" and strong else ("qdq" if precision == "int8" else "source")
    flags = [] if strong else [precision.upper()]
    return {"graph": graph, "strongly_typed": strong, "flags": flags, "clear_tf32": False}


def build(
    graph_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    precision: str = "fp32",
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    typing: str = "auto",
    batch: tuple[int, int, int] = (1, 1, 8),
    workspace_bytes: int | None = None,
    optimization_level: int | None = None,
    prefer_polygraphy: bool = True,
    threads: int | None = None,
) -> EngineArtifact:
    """Build `<output_dir>/<name>.<precision>.plan` and its sidecar from a prepared graph; returns the artifact.

    `graph_path` already has the precision: the fp32 ONNX, the fp16 graph or the Q/DQ int8 ONNX (the
    same graphs ONNX Runtime runs; ``calibration.prepare.prepare_graph('tensorrt', ...)`` makes them).
    Only ``typing='weak'`` fp16 also takes the fp32 ONNX, as TensorRT 10's FP16 flag did. `metadata`
    (the prepared graph's) goes into the sidecar. `batch` = (min, opt, max) for the dynamic batch
    dimension of every input. `threads` is accepted like every backend's and unused: TensorRT runs on the GPU.
    """
    BACKENDS["tensorrt"].check_precision(precision)
    graph_path = Path(graph_path)
    source = load_onnx(graph_path)
    problem = graph_precision_problem(source, precision, typing)
    if problem:
        raise EngineError(
            f"{graph_path.name} {problem}; prepare it first with "
            f"calibration.prepare.prepare_graph('tensorrt', onnx_path, work_dir, '{precision}', ...)"
        )
    inputs, outputs = onnx_io_metadata(source)
    profile = batch_profile(inputs, batch)
    trt = _trt()
    device = cuda_api().device_info()
    features = trt_features(trt)
    plan = plan_precision(precision, features, typing)
    plan_file = engine_file(graph_path, output_dir, name, precision, ".plan")

    poly = _polygraphy_trt() if prefer_polygraphy else None
    if poly is not None and plan["strongly_typed"] and "strongly_typed" not in inspect.signature(poly.NetworkFromOnnxPath).parameters:
        poly = None  # a Polygraphy older than strongly typed networks: build on the TensorRT API directly
    if poly is not None:
        serialized = _build_with_polygraphy(poly, trt, graph_path, plan, profile, workspace_bytes, optimization_level)
    else:
        serialized = _build_with_tensorrt(trt, graph_path, plan, profile, workspace_bytes, optimization_level)
    plan_path = write_atomic(plan_file, serialized)

    layer_precisions = inspect_precisions(trt, serialized)
    executed, note = executed_precision(precision, plan, layer_precisions)
    graph_sha256 = sha256_file(graph_path)
    metadata = {
        **source_metadata(graph_path, graph_sha256, metadata),
        "tensorrt_version": trt.__version__,
        **device,
        "typing": "strong" if plan["strongly_typed"] else "weak",
        "builder_flags": plan["flags"],
        "tf32": bool(features["tf32_flag"]) and not plan["clear_tf32"],
        "built_from": graph_path.name,
        "built_from_sha256": graph_sha256,
        "batch": list(batch),
        "builder": "polygraphy" if poly is not None else "tensorrt",
        "layer_precisions": layer_precisions,
    }
    artifact = EngineArtifact(
        backend="tensorrt",
        path=plan_path,
        precision_requested=precision,
        precision_executed=executed,
        device=f"cuda:0 ({device['gpu_name']}, sm_{device['compute_capability'].replace('.', '')})",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        metadata=metadata,
        notes=(note,) if note else (),
    )
    artifact.save()
    return artifact


def graph_precision_problem(model, precision: str, typing: str = "auto") -> str:
    """Why `model` is not a graph of `precision` ('' when it looks like one): a cheap look, not a check.

    int8 needs QuantizeLinear/DequantizeLinear nodes; fp16 needs float16 weights, except with
    ``typing='weak'``, where the FP16 builder flag lowers an fp32 ONNX too.
    """
    if precision == "int8" and not any(node.op_type in QDQ_OPS for node in model.graph.node):
        return "has no QuantizeLinear/DequantizeLinear nodes: it is not a Q/DQ int8 graph"
    if precision == "fp16" and typing != "weak" and not any(i.data_type == FLOAT16 for i in model.graph.initializer):
        return "has no float16 weights: it is not an fp16 graph"
    return ""


def batch_profile(inputs, batch: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes per input: the dynamic batch dimension spans `batch`; nothing else may be dynamic."""
    low, opt, high = batch
    if not 1 <= low <= opt <= high:
        raise EngineError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}")
    shapes = {}
    for meta in inputs:
        if any(d is None for d in meta.shape[1:]):
            raise EngineError(f"input '{meta.name}' {meta.describe()} has dynamic dimensions besides the batch; export it with a fixed H/W")
        rest = tuple(meta.shape[1:])
        if meta.shape and meta.shape[0] is None:
            shapes[meta.name] = ((low, *rest), (opt, *rest), (high, *rest))
        else:
            shapes[meta.name] = (tuple(meta.shape),) * 3
    return shapes


def _build_with_polygraphy(poly, trt, graph_path: Path, plan, profile, workspace_bytes, optimization_level) -> bytes:
    shapes = poly.Profile()
    for name, (low, opt, high) in profile.items():
        shapes.add(name, min=low, opt=opt, max=high)
    config_args: dict[str, Any] = {
        "profiles": [shapes],
        "tf32": not plan["clear_tf32"],
        "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,
    }
    if "FP16" in plan["flags"]:
        config_args["fp16"] = True
    if "INT8" in plan["flags"]:
        config_args["int8"] = True
    if workspace_bytes is not None:
        config_args["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)}
    if optimization_level is not None:
        config_args["builder_optimization_level"] = int(optimization_level)
    network_args = {"strongly_typed": True} if plan["strongly_typed"] else {}
    network = poly.NetworkFromOnnxPath(str(graph_path), **network_args)
    try:
        serialized = poly.engine_bytes_from_network(network, config=poly.CreateConfig(**config_args))
    except Exception as exc:
        raise EngineError(f"TensorRT could not build {graph_path.name}: {exc}") from exc
    return bytes(serialized)


def _build_with_tensorrt(trt, graph_path: Path, plan, profile, workspace_bytes, optimization_level) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {graph_path.name}: {errors}")
    config = builder.create_builder_config()
    shapes = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan["clear_tf32"]:
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build {graph_path.name}; see the TensorRT log above")
    return bytes(serialized)


# Data-type words of the inspector's format strings ("Row major linear FP32", "... Int8 format") and
# of TensorRT 11's separate DataType field ("Half", "Float"); the first match wins.
_TYPE_WORDS = (
    ("int8", ("Int8", "INT8")),
    ("fp8", ("FP8", "Fp8")),
    ("int4", ("Int4", "INT4")),
    ("bf16", ("BFloat16", "BF16")),
    ("fp16", ("Half", "FP16")),
    ("fp32", ("Float", "FP32")),
)


def inspect_precisions(trt, serialized: bytes) -> dict[str, int]:
    """How many layer inputs/outputs the built engine holds in each data type (engine inspector).

    The inspector's JSON changed between releases (TensorRT 11 split 'Format/Datatype' into two
    fields), so only the fields whose key mentions a format or type are read, for data-type words.
    """
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise EngineError("TensorRT built a plan it cannot deserialize; see the TensorRT log")
    inspector = engine.create_engine_inspector()
    try:
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except (ValueError, AttributeError):
        return {}
    return layer_precision_counts(info)


def layer_precision_counts(info: Mapping[str, Any]) -> dict[str, int]:
    """Data-type counts over the layer inputs/outputs of an engine inspector JSON document."""
    counts: dict[str, int] = {}
    for layer in info.get("Layers", []) if isinstance(info, dict) else []:
        if not isinstance(layer, dict):
            continue
        for tensor in [*layer.get("Inputs", []), *layer.get("Outputs", [])]:
            if not isinstance(tensor, dict):
                continue
            text = " ".join(str(v) for k, v in tensor.items() if re.search("format|type", k, re.IGNORECASE))
            for precision, words in _TYPE_WORDS:
                if any(re.search(rf"\b{w}\b", text) for w in words):
                    counts[precision] = counts.get(precision, 0) + 1
                    break
    return counts


def executed_precision(precision: str, plan: Mapping[str, Any], layer_precisions: Mapping[str, int]) -> tuple[str, str]:
    if not layer_precisions:
        return precision, "layer precisions could not be read from the engine inspector"
    if precision == "int8" and not layer_precisions.get("int8"):
        return "fp16" if layer_precisions.get("fp16") else "fp32", "TensorRT chose no int8 layer"
    if precision == "fp16" and not layer_precisions.get("fp16"):
        return "fp32", "TensorRT chose no fp16 layer"
    if precision == "fp32" and (layer_precisions.get("fp16") or layer_precisions.get("int8")):
        return "mixed", "the fp32 engine has reduced-precision layers"
    return precision, ""
