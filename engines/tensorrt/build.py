"""Build TensorRT plans (TensorRT 10 and 11) from a prepared ONNX graph.

The graph comes prepared (``calibration.prepare.prepare_graph('tensorrt', ...)``): the fp32 ONNX, the
fp16 graph (explicit Casts, sensitive ops in fp32) or the fp16 Q/DQ int8 graph (the Q/DQ graph with
everything outside the Q/DQ pairs in fp16, `calibration.qdq_fp16`). Precision is decided by
feature detection, not by version numbers:

- strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists): the graph's types are
  the precision: fp16 builds the fp16 graph, int8 the fp16 Q/DQ graph. There is no fallback, which
  is why int8 is not built from the fp32 Q/DQ graph: its LayerNorm, Softmax, GELU and residual adds
  would run in fp32. TensorRT 11 knows nothing else.
- weakly typed (``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` exist, TensorRT 10): the FP16 flag on the
  fp32 ONNX (``typing='weak'`` takes it as is) or on the fp16 graph; INT8 together with FP16 on a
  Q/DQ graph, so that TensorRT may run what is not quantized in fp16. Nodes kept in fp32
  (``keep_fp32``) are pinned: their layers' precision and output types set to fp32, obeyed
  (``OBEY_PRECISION_CONSTRAINTS``); strongly typed, the prepared graph's types already keep them.

TF32 is cleared in every plan: it is on by default in a builder config, and would make the fp32
parts (fp32 plans, and the ops an fp16 or int8 graph keeps in fp32) compute in TF32.

Polygraphy's loaders do the building when installed and new enough for this TensorRT; otherwise the
same steps run on the raw TensorRT API. Nothing here runs without an NVIDIA GPU.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.artifact import EngineArtifact, onnx_io_metadata
from engines.errors import EngineError
from engines.files import engine_file, load_onnx, sha256_file, source_metadata, write_atomic
from engines.registry import BACKENDS
from engines.tensorrt.cache import BuildCaches
from engines.tensorrt.runner import _trt, cuda_api, trt_features, trt_logger, usable_polygraphy
from engines.tensorrt.timing import gpu_facts

TYPINGS = ("auto", "strong", "weak")
FLOAT16 = 10  # onnx.TensorProto.FLOAT16
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
DEFAULT_BATCH = (1, 1, 8)

__all__ = ["DEFAULT_BATCH", "TYPINGS", "batch_range", "build", "layers_to_pin", "plan_precision", "trt_features"]


def plan_precision(
    precision: str, features: Mapping[str, Any], typing: str = "auto", keep_fp32: Sequence[str] = ()
) -> dict[str, Any]:
    """How to build `precision` with these features: which graph ('source', 'fp16', 'qdq_fp16', 'qdq'),
    whether the network is strongly typed, which builder flags to set, and whether to clear TF32.
    Weakly typed with `keep_fp32` (ONNX node names), the plan also names those nodes ("keep_fp32") and
    adds OBEY_PRECISION_CONSTRAINTS: without it TensorRT takes a layer's precision as a hint only.
    Pure, so it is testable anywhere."""
    if typing not in TYPINGS:
        raise EngineError(f"unknown typing '{typing}'; choose one of {', '.join(TYPINGS)}")
    strong_ok = bool(features.get("strongly_typed"))
    clear_tf32 = bool(features.get("tf32_flag"))
    if typing == "strong" and not strong_ok:
        raise EngineError(f"TensorRT {features.get('version')} has no strongly typed networks; use typing='weak'")
    if precision == "fp32":
        return {"graph": "source", "strongly_typed": strong_ok, "flags": [], "clear_tf32": clear_tf32}
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
    if strong:
        return {"graph": "fp16" if precision == "fp16" else "qdq_fp16", "strongly_typed": True, "flags": [], "clear_tf32": clear_tf32}
    # Weakly typed int8 without FP16 would run every unquantized layer in fp32.
    flags = ["FP16"] if precision == "fp16" else (["FP16", "INT8"] if features.get("fp16_flag") else ["INT8"])
    plan = {"graph": "source" if precision == "fp16" else "qdq", "strongly_typed": False, "flags": flags, "clear_tf32": clear_tf32}
    if keep_fp32:
        # In the plan, so that the plan cache's key (which hashes the plan) tells keeps apart.
        plan.update(flags=[*flags, "OBEY_PRECISION_CONSTRAINTS"], keep_fp32=sorted(set(keep_fp32)))
    return plan


def layers_to_pin(layer_names: Sequence[str], keep_fp32: Iterable[str], node_names: Iterable[str] = ()) -> list[int]:
    """Indices of the network layers that TensorRT's ONNX parser made from the `keep_fp32` ONNX nodes.

    The parser names a node's layer after the node, and further layers of the same node after it with
    a numeric suffix (``<node>_<n>``); a suffixed name that is itself an ONNX node (``/MatMul_1`` beside
    ``/MatMul``) is that node's layer, not a helper of the shorter one.
    """
    keep, nodes = set(keep_fp32), set(node_names)
    indices = []
    for index, name in enumerate(layer_names):
        base, _, suffix = name.rpartition("_")
        if name in keep or (base in keep and suffix.isdigit() and name not in nodes):
            indices.append(index)
    return indices


def batch_range(batch: tuple[int, int, int] | None = None, max_batch: int | None = None) -> tuple[int, int, int]:
    """The (min, opt, max) batch of the optimisation profile: `batch` as given, or (1, 1, max_batch)
    for `max_batch` (opt 1: on a Jetson the latency of one image is what is tuned for), else
    DEFAULT_BATCH."""
    if batch is not None and max_batch is not None:
        raise EngineError("give batch=(min, opt, max) or max_batch, not both")
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise EngineError(f"max_batch must be a whole number of at least 1, got {max_batch!r}")
        return (1, 1, max_batch)
    chosen = tuple(batch) if batch is not None else DEFAULT_BATCH
    if len(chosen) != 3 or not all(isinstance(b, int) and not isinstance(b, bool) for b in chosen) or not 1 <= chosen[0] <= chosen[1] <= chosen[2]:
        raise EngineError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}")
    return chosen


def build(
    graph_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    precision: str = "fp32",
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    typing: str = "auto",
    batch: tuple[int, int, int] | None = None,
    max_batch: int | None = None,
    threads: int | None = None,
    workspace_bytes: int | None = None,
    workspace_mib: int | None = None,
    optimization_level: int | None = None,
    dla_core: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    prefer_polygraphy: bool = True,
    keep_fp32: Sequence[str] = (),
) -> EngineArtifact:
    """Build `<output_dir>/<name>.<precision>.plan` and its sidecar from a prepared graph; returns the artifact.

    `graph_path` already has the precision: the fp32 ONNX, the fp16 graph or the fp16 Q/DQ int8
    graph (``calibration.prepare.prepare_graph('tensorrt', ...)`` makes them). Only ``typing='weak'``
    also takes the fp32 ONNX for fp16, and the fp32 Q/DQ graph for int8, as TensorRT 10's builder
    flags did. `metadata` (the prepared graph's) goes into the sidecar.

    The optimisation profile of the dynamic batch dimension of every input is `batch` = (min, opt,
    max), or (1, 1, `max_batch`) -- what ``mtlora-export build --max-batch N`` passes -- or (1, 1, 8);
    the sidecar records it as ``metadata["batch"]`` and the runner names it when a batch is outside.
    `threads` is the CPU thread count every backend's build takes; TensorRT builds and runs on the
    GPU, so it is recorded in the sidecar and not used.

    `workspace_mib` (or `workspace_bytes`) caps the builder's workspace pool (TensorRT's default is
    the whole device memory, which a Jetson shares with the CPU); `optimization_level` is the builder
    optimisation level (0-5, TensorRT's default 3). `dla_core` builds for that DLA core with GPU
    fallback (refused on a device without DLA). `cache_dir` keeps a timing cache and finished plans
    (`engines.tensorrt.cache`), keyed by TensorRT version, compute capability and device name, so a
    rebuild on the same device reuses both.

    `keep_fp32` (ONNX node names, globs already expanded; the prepared graph's ``fp32_nodes``) keeps
    those nodes in fp32: strongly typed, the prepared fp16 graph's types do it and the names are only
    checked; weakly typed, their layers are pinned to fp32 (`layers_to_pin`). The sidecar records
    them (``metadata["kept_fp32"]``).
    """
    BACKENDS["tensorrt"].check_precision(precision)
    batch = batch_range(batch, max_batch)
    workspace_bytes = workspace_limit(workspace_bytes, workspace_mib)
    check_optimization_level(optimization_level)
    check_dla_core(dla_core)
    graph_path = Path(graph_path)
    source = load_onnx(graph_path)
    problem = graph_precision_problem(source, precision, typing)
    if problem:
        raise EngineError(
            f"{graph_path.name} {problem}; prepare it first with "
            f"calibration.prepare.prepare_graph('tensorrt', onnx_path, work_dir, '{precision}', ...)"
        )
    node_names = [node.name for node in source.graph.node]
    keep_fp32 = checked_keep(keep_fp32, node_names, graph_path.name) if precision != "fp32" else []
    inputs, outputs = onnx_io_metadata(source)
    profile = batch_profile(inputs, batch)
    trt = _trt()
    device = cuda_api().device_info()
    features = trt_features(trt)
    plan = plan_precision(precision, features, typing, keep_fp32)
    plan_file = engine_file(graph_path, output_dir, name, precision, ".plan")
    settings = BuildSettings(workspace_bytes, optimization_level, dla_core, bool(features.get("strongly_typed_flag")))

    notes: list[str] = []
    if dla_core is not None and batch[0] != batch[2]:
        notes.append(f"DLA takes static shapes only: with batch {batch[0]} to {batch[2]}, TensorRT hands the layers to "
                     "the GPU (GPU fallback); build with max_batch=1 (--max-batch 1) for a DLA engine")
    caches = BuildCaches(cache_dir, trt.__version__, device) if cache_dir is not None else None
    graph_sha256 = sha256_file(graph_path)
    key = caches.plan_key(graph_sha256, precision, plan, profile, settings) if caches else ""
    serialized = caches.cached_plan(key) if caches else None
    poly = None
    if serialized is not None:
        notes.append(f"plan reused from the plan cache ({caches.plans.name}/{key[:12]}...)")
    else:
        # Pinning layers needs the parsed network in hand: that build runs on the TensorRT API.
        poly, poly_note = usable_polygraphy(trt, prefer_polygraphy and dla_core is None and "keep_fp32" not in plan)
        if poly_note:
            notes.append(poly_note)
        timing = caches.timing_cache if caches else None
        if poly is not None:
            serialized = _build_with_polygraphy(poly, trt, graph_path, plan, profile, settings, timing)
        else:
            serialized = _build_with_tensorrt(trt, graph_path, plan, profile, settings, timing, node_names)
        if caches:
            caches.keep_plan(key, serialized)
    plan_path = write_atomic(plan_file, serialized)

    layer_precisions, opaque_layers = inspect_precisions(trt, serialized)
    executed, note = executed_precision(precision, plan, layer_precisions, opaque_layers)
    if note:
        notes.append(note)
    metadata = {
        **source_metadata(graph_path, graph_sha256, metadata),
        "tensorrt_version": trt.__version__,
        **device,
        **gpu_facts(),  # clocks and, on a Jetson, the power mode at build time, where the system shows them
        "typing": "strong" if plan["strongly_typed"] else "weak",
        "builder_flags": plan["flags"],
        "tf32": bool(features["tf32_flag"]) and not plan["clear_tf32"],
        "built_from": graph_path.name,
        "built_from_sha256": graph_sha256,
        "batch": list(batch),
        "threads": threads,
        "builder": "polygraphy" if poly is not None else "tensorrt",
        "workspace_bytes": workspace_bytes,
        "optimization_level": optimization_level,
        "dla_core": dla_core,
        "profiling_verbosity": "detailed (the runner lowers NVTX to layer names)",
        "layer_precisions": layer_precisions,
        "opaque_layers": opaque_layers,
    }
    if keep_fp32:
        how = "pinned layers (OBEY_PRECISION_CONSTRAINTS)" if "keep_fp32" in plan else "the fp16 graph's types"
        metadata["kept_fp32"] = {"asked": keep_fp32, "how": how}
    artifact = EngineArtifact(
        backend="tensorrt",
        path=plan_path,
        precision_requested=precision,
        precision_executed=executed,
        device=f"cuda:0 ({device['gpu_name']}, sm_{device['compute_capability'].replace('.', '')})",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        metadata=metadata,
        notes=tuple(notes),
    )
    artifact.save()
    return artifact


def graph_precision_problem(model, precision: str, typing: str = "auto") -> str:
    """Why `model` is not a graph of `precision` ('' when it looks like one): a cheap look, not a check.

    int8 needs QuantizeLinear/DequantizeLinear nodes and, unless ``typing='weak'``, float16 around
    them (the fp16 Q/DQ graph); fp16 needs float16 weights, except with ``typing='weak'``, where the
    FP16 builder flag lowers an fp32 ONNX too.
    """
    has_fp16 = any(i.data_type == FLOAT16 for i in model.graph.initializer)
    if precision == "int8" and not any(node.op_type in QDQ_OPS for node in model.graph.node):
        return "has no QuantizeLinear/DequantizeLinear nodes: it is not a Q/DQ int8 graph"
    if precision == "int8" and typing != "weak" and not has_fp16:
        return (
            "is an fp32 Q/DQ graph: a strongly typed int8 engine built from it would run everything "
            "outside the Q/DQ pairs in fp32; it needs the fp16 Q/DQ graph"
        )
    if precision == "fp16" and typing != "weak" and not has_fp16:
        return "has no float16 weights: it is not an fp16 graph"
    return ""


def batch_profile(inputs, batch: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes per input: the dynamic batch dimension spans `batch`; nothing else may be dynamic."""
    low, opt, high = batch_range(tuple(batch))
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


def _build_with_polygraphy(poly, trt, graph_path: Path, plan, profile, settings, timing_cache: Path | None) -> bytes:
    poly_profile = poly.Profile()
    for name, (low, opt, high) in profile.items():
        poly_profile.add(name, min=low, opt=opt, max=high)
    config_args: dict[str, Any] = {
        "profiles": [poly_profile],
        "tf32": not plan["clear_tf32"],
        "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,
    }
    # The plan names only flags this TensorRT has (plan_precision checks fp16_flag / int8_flag).
    if "FP16" in plan["flags"]:
        config_args["fp16"] = True
    if "INT8" in plan["flags"]:
        config_args["int8"] = True
    if settings.workspace_bytes is not None:
        config_args["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(settings.workspace_bytes)}
    if settings.optimization_level is not None:
        config_args["builder_optimization_level"] = int(settings.optimization_level)
    save_cache = {}
    if timing_cache is not None:
        if timing_cache.is_file():
            config_args["load_timing_cache"] = str(timing_cache)
        save_cache["save_timing_cache"] = str(timing_cache)
    # Where strong typing is always on, the flag is deprecated or gone: nothing to ask for.
    network_args = {"strongly_typed": True} if plan["strongly_typed"] and settings.strongly_typed_flag else {}
    network_loader = poly.NetworkFromOnnxPath(str(graph_path), **network_args)
    try:
        serialized = poly.engine_bytes_from_network(network_loader, config=poly.CreateConfig(**config_args), **save_cache)
    except Exception as exc:
        raise EngineError(f"TensorRT could not build {graph_path.name}: {exc}") from exc
    return bytes(serialized)


def checked_keep(keep_fp32: Sequence[str], node_names: Sequence[str], graph: str) -> list[str]:
    """The kept ONNX node names, each once; an EngineError names those the graph does not have."""
    if isinstance(keep_fp32, str) or any(not isinstance(n, str) or not n for n in keep_fp32):
        raise EngineError(f"keep_fp32 must be a list of ONNX node names, got {keep_fp32!r}")
    keep = list(dict.fromkeys(keep_fp32))
    unknown = [n for n in keep if n not in set(node_names)]
    if unknown:
        raise EngineError(
            f"{graph} has no node named {', '.join(repr(n) for n in unknown[:5])}; keep_fp32 takes node names of "
            "the graph built (expand globs with calibration.fp16.match_nodes first)"
        )
    return keep


def pin_fp32(trt, network, keep_fp32: Sequence[str], node_names: Sequence[str]) -> list[str]:
    """Set precision and output types to fp32 on the layers of the kept ONNX nodes whose outputs are
    floating point (shape and index layers keep their integer types); returns their names."""
    float_types = (trt.DataType.FLOAT, trt.DataType.HALF)
    names = [network.get_layer(i).name for i in range(network.num_layers)]
    pinned = []
    for index in layers_to_pin(names, keep_fp32, node_names):
        network_layer = network.get_layer(index)
        outputs = range(network_layer.num_outputs)
        if not all(network_layer.get_output(i).dtype in float_types for i in outputs):
            continue
        # Weak typing's API (TensorRT 10); plan_precision plans a pin only where weak typing exists.
        if hasattr(network_layer, "precision") and hasattr(network_layer, "set_output_type"):
            network_layer.precision = trt.DataType.FLOAT
            for i in outputs:
                network_layer.set_output_type(i, trt.DataType.FLOAT)
            pinned.append(network_layer.name)
    return pinned


def _build_with_tensorrt(
    trt, graph_path: Path, plan, profile, settings, timing_cache: Path | None, node_names: Sequence[str] = ()
) -> bytes:
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    # TensorRT 11.4 deprecates the flag (strong typing is always on) and a later release removes it.
    if plan["strongly_typed"] and settings.strongly_typed_flag:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if settings.dla_core is not None and builder.num_DLA_cores == 0:
        raise EngineError(dla_refusal(graph_path.name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {graph_path.name}: {errors}")
    if plan.get("keep_fp32") and not pin_fp32(trt, network, plan["keep_fp32"], node_names):
        raise EngineError(f"no TensorRT layer of {graph_path.name} comes from the kept nodes {plan['keep_fp32'][:5]}")
    config = builder.create_builder_config()
    optimization_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization_profile)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in builder_flags(trt, plan):
        config.set_flag(flag)
    if plan["clear_tf32"]:
        config.clear_flag(trt.BuilderFlag.TF32)
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    if settings.optimization_level is not None:
        config.builder_optimization_level = int(settings.optimization_level)
    if settings.dla_core is not None:
        # DL4AGX's way for decoders: the DLA core runs what it can, the GPU the rest.
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(settings.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build {graph_path.name}; see the TensorRT log above")
    if cache is not None:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


@dataclass(frozen=True)
class BuildSettings:
    """The builder settings besides precision: workspace cap, optimisation level, DLA core, and
    whether this TensorRT still has the STRONGLY_TYPED creation flag to set."""

    workspace_bytes: int | None = None
    optimization_level: int | None = None
    dla_core: int | None = None
    strongly_typed_flag: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"workspace_bytes": self.workspace_bytes, "optimization_level": self.optimization_level,
                "dla_core": self.dla_core}


OPTIMIZATION_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0 to 5, default 3
MIB = 1 << 20


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def workspace_limit(workspace_bytes: int | None, workspace_mib: int | None) -> int | None:
    """The workspace pool cap in bytes from either unit (None: TensorRT's default, the device memory)."""
    if workspace_bytes is not None and workspace_mib is not None:
        raise EngineError("give workspace_bytes or workspace_mib, not both")
    for name, value in (("workspace_bytes", workspace_bytes), ("workspace_mib", workspace_mib)):
        if value is not None and (not _whole(value) or value < 1):
            raise EngineError(f"{name} must be a whole number of at least 1, got {value!r}")
    return workspace_mib * MIB if workspace_mib is not None else workspace_bytes


def check_optimization_level(level: int | None) -> None:
    if level is not None and (not _whole(level) or level not in OPTIMIZATION_LEVELS):
        raise EngineError(f"optimization_level must be 0 to 5 (TensorRT's builder optimisation level), got {level!r}")


def check_dla_core(core: int | None) -> None:
    if core is not None and (not _whole(core) or core < 0):
        raise EngineError(f"dla_core must be a DLA core number (0 or more), got {core!r}")


def dla_refusal(graph: str) -> str:
    return (f"cannot build {graph} for DLA: this device has no DLA core (Builder.num_DLA_cores is 0; DLA exists "
            "on Jetson AGX/NX Orin and Xavier); build without --dla")


def builder_flags(trt, plan: Mapping[str, Any]) -> list:
    """The BuilderFlag members the plan names; plan_precision only names flags whose feature exists."""
    return [getattr(trt.BuilderFlag, flag) for flag in plan["flags"]]


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


def inspect_precisions(trt, serialized: bytes) -> tuple[dict[str, int], int]:
    """How many layer inputs/outputs the built engine holds in each data type (engine inspector), and
    how many of its layers are opaque regions (see `opaque_layer_count`).

    The inspector's JSON changed between releases (TensorRT 11 split 'Format/Datatype' into two
    fields), so only the fields whose key mentions a format or type are read, for data-type words.
    """
    runtime = trt.Runtime(trt_logger(trt))
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise EngineError("TensorRT built a plan it cannot deserialize; see the TensorRT log")
    inspector = engine.create_engine_inspector()
    try:
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except (ValueError, AttributeError):
        return {}, 0
    return layer_precision_counts(info), opaque_layer_count(info)


def opaque_layer_count(info: Mapping[str, Any]) -> int:
    """Layers whose inside the inspector does not show: Myelin regions ("LayerType": "Myelin", named
    "{ForeignNode[first...last]}"), where TensorRT puts whole transformer blocks. Their listed inputs
    and outputs are only the region's boundary tensors, so the precision inside is not observable."""
    count = 0
    for layer in info.get("Layers", []) if isinstance(info, dict) else []:
        if isinstance(layer, dict) and (
            str(layer.get("LayerType", "")).lower() == "myelin" or "ForeignNode" in str(layer.get("Name", ""))
        ):
            count += 1
    return count


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


def executed_precision(
    precision: str, plan: Mapping[str, Any], layer_precisions: Mapping[str, int], opaque_layers: int = 0
) -> tuple[str, str]:
    """(the precision the engine is claimed to run, a note): the request, unless the inspector shows otherwise.

    Seeing reduced-precision tensors in an fp32 plan is evidence ('mixed'). Not seeing int8 or fp16
    tensors is evidence only when every layer is visible: inside Myelin regions the inspector lists
    boundary tensors only, so there the claim stays and the note says it is not observable.
    """
    if not layer_precisions:
        return precision, "layer precisions could not be read from the engine inspector"
    if precision == "fp32" and (layer_precisions.get("fp16") or layer_precisions.get("int8")):
        return "mixed", "the fp32 engine has reduced-precision layers"
    wanted = {"int8": "int8", "fp16": "fp16"}.get(precision)
    if wanted is None or layer_precisions.get(wanted):
        return precision, ""
    if opaque_layers:
        return precision, (
            f"no {wanted} tensor is visible, but {opaque_layers} layer(s) are Myelin regions whose inside the engine "
            f"inspector does not show; whether they run in {wanted} is not observable"
        )
    if precision == "int8":
        return ("fp16" if layer_precisions.get("fp16") else "fp32"), "TensorRT chose no int8 layer"
    return "fp32", "TensorRT chose no fp16 layer"
