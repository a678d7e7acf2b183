"""Build OpenVINO engines: IR (xml + bin) from a prepared graph, compiled once and exported as a blob.

The graph comes prepared (``calibration.prepare.prepare_graph('openvino', ...)``): the ONNX for fp32,
fp16 and bf16 (fp16 compresses weights to fp16 here, on saving the IR), for fp16 and bf16 with
``keep_fp32`` an IR whose kept ops carry OpenVINO's fp32 mark (`engines.openvino.keep`), and the
NNCF-quantized IR for int8. Every compile sets INFERENCE_PRECISION_HINT explicitly, and the artifact
records the precision read back from the compiled model, so an "fp32" engine that a bf16-capable CPU
would have run in bf16 cannot pass unnoticed; likewise kept nodes are proven from the runtime graph.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engines.artifact import EngineArtifact, onnx_io_metadata
from engines.errors import EngineError
from engines.files import engine_file, load_onnx, sha256_file, source_metadata, write_atomic
from engines.openvino.keep import kept_note, kept_record, mark_kept, ops_of_onnx_nodes, prove_kept
from engines.openvino.runner import (
    CAPABILITY_OF,
    HINTS,
    PRECISION_OF_HINT,
    _ov,
    check_device,
    compile_config,
    device_capabilities,
    device_name,
    io_metadata,
    openvino_version,
    read_back_precision,
    runtime_precisions,
)
from engines.openvino.signal_stack import core_with_plugins
from engines.registry import BACKENDS

# What a quantized OpenVINO model holds: FakeQuantize/FakeConvert ops, or int8/uint8 weights
# (NNCF's compressed form: an i8 Constant, a Convert and a scale Multiply).
QUANTIZE_OP_TYPES = ("FakeQuantize", "FakeConvert")
QUANTIZED_WEIGHT_TYPES = ("i8", "u8")
QDQ_ONNX_OPS = ("QuantizeLinear", "DequantizeLinear")


def build(
    graph_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    precision: str = "fp32",
    device: str = "CPU",
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    export_blob: bool = True,
    performance_hint: str = "LATENCY",
    threads: int | None = None,
    keep_fp32: Sequence[str] = (),
) -> EngineArtifact:
    """Build `<output_dir>/<name>.<precision>.xml/.bin` (+ `.<device>.blob`) and the sidecar.

    `graph_path` is an ONNX or an IR `.xml` that already has the precision: for int8 a quantized
    model (``calibration.prepare.prepare_graph('openvino', ..., 'int8', calibration=...)`` makes the
    NNCF IR). "fp16" asks for 16-bit speed: the engine runs the fastest of f32, bf16 and f16 (those
    the device offers) measured here at batch 1, so on a CPU with AMX or AVX-512 BF16 it runs bf16,
    and where no 16-bit format is faster it runs f32; an int8 model's float remainder is chosen the
    same way. "bf16" runs bf16 where the device has it, else f32. The notes and
    `precision_executed` (read back from the compiled model) say what ran; the measurements go into
    the sidecar (`inference_precision_selection`). `metadata` (the prepared graph's) goes there too.

    `keep_fp32` (ONNX node names, globs already expanded) keeps those nodes in fp32 at fp16/bf16: an
    ONNX graph is marked here; an IR prepared with ``prepare_graph(..., keep_fp32=...)`` carries its
    marks and the names are checked against them. Whatever was kept, the runtime graph says which kept
    nodes really ran f32: ``metadata["kept_fp32"]`` = {"asked", "ran_f32", "not_f32" (with the layers
    and precisions that ran), "not_executed", "layer_types"}, and a note names those not kept.
    """
    BACKENDS["openvino"].check_precision(precision)
    keep_fp32 = _checked_keep(keep_fp32, precision)
    ov = _ov()
    core = core_with_plugins(ov)
    check_device(core, device)
    full_name, capabilities = device_name(core, device), device_capabilities(core, device)
    hint = HINTS[precision]
    capability = CAPABILITY_OF.get(precision)
    notes: list[str] = []
    if precision == "bf16" and capability not in capabilities:
        hint = "f32"
        notes.append(f"{device} ({full_name}) has no {capability} support: runs f32")

    graph_path = Path(graph_path)
    model, inputs, outputs, source = _read_graph(ov, core, graph_path, precision)
    kept = _kept_nodes(model, source, graph_path, precision, keep_fp32)
    if kept and source is not None:
        model = mark_kept(core, model, kept, output_dir)
    selection = None
    if precision in MEASURED_PRECISIONS:
        # "fp16" is a request for 16-bit speed, and an int8 model's float remainder should be as fast as it
        # can: which format that is depends on the CPU (bf16 on AMX / AVX-512 BF16, f16 only with AMX-FP16;
        # f16 where it is emulated is slower than f32), so it is measured here, not assumed.
        selection = fastest_inference_precision(core, model, device, capabilities, inputs, threads, kept=kept)
        hint = selection["chosen"]
        notes.append(_selection_note(precision, selection))
    config = compile_config(inference_precision=hint, performance_hint=performance_hint, num_threads=threads)
    xml = engine_file(graph_path, output_dir, name, precision, ".xml")
    graph_sha256 = sha256_file(graph_path)
    metadata = {
        **source_metadata(graph_path, graph_sha256, metadata),
        "openvino_version": openvino_version(),
        "device_name": full_name,
        "capabilities": capabilities,
        "built_from": str(graph_path),
        "built_from_sha256": graph_sha256,
    }
    if graph_path.suffix == ".xml":
        metadata["built_from_bin_sha256"] = sha256_file(graph_path.with_suffix(".bin"))

    save_ir(ov, model, xml, compress_to_fp16=precision == "fp16")
    try:
        compiled = core.compile_model(str(xml), device, config)
    except Exception as exc:
        raise EngineError(f"OpenVINO could not compile {xml.name} for {device}: {exc}") from exc

    executed = read_back_precision(compiled)
    runtime = runtime_precisions(compiled)
    metadata.update(config=config, inference_precision=executed, runtime_precisions=runtime["counts"])
    if kept:
        proof = prove_kept(compiled, model, kept)
        metadata["kept_fp32"] = proof
        note = kept_note(proof, hint, device)
        if note:
            notes.append(note)
    if selection is not None:
        metadata["inference_precision_selection"] = selection
    if precision == "int8":
        metadata["int8_layers"] = runtime["int8_layers"]
        if runtime["int8_layers"]:
            executed = "int8"
        else:
            notes.append(f"no int8 kernel in the compiled graph on {device}: int8 is only simulated")
    if executed != precision and precision != "int8" and selection is None and not notes:
        notes.append(f"asked for {precision}, {device} compiled it as {executed}")

    extra = [xml.with_suffix(".bin")]
    if export_blob:
        blob = xml.with_suffix(f".{device}.blob")
        exported = compiled.export_model()  # bytes in older releases, io.BytesIO in newer ones
        write_atomic(blob, exported.getvalue() if hasattr(exported, "getvalue") else bytes(exported))
        extra.append(blob)
    artifact = EngineArtifact(
        backend="openvino",
        path=xml,
        precision_requested=precision,
        precision_executed=executed,
        device=device,
        extra_paths=tuple(extra),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        metadata=metadata,
        notes=tuple(notes),
    )
    artifact.save()
    return artifact


# Precisions whose float part runs in the fastest format measured on the device (see `build`).
MEASURED_PRECISIONS = ("fp16", "int8")
# Precisions at which nodes can be kept in fp32 (keep_fp32).
KEEPS_FP32 = ("fp16", "bf16")
# OpenVINO inference precisions a 16-bit request may run in, with the capability the device must report.
SIXTEEN_BIT = (("bf16", "BF16"), ("f16", "FP16"))
SELECTION_RUNS = 3
SELECTION_MARGIN = 0.9  # a 16-bit format is chosen only when at least 10% faster than f32


def fastest_inference_precision(
    core, model, device: str, capabilities, inputs, threads: int | None, kept: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compile `model` with every inference precision the device offers (f32 and its 16-bit formats),
    time a batch of one with each, and return {"chosen": hint, "ms": {hint: fastest of the runs}}.
    With `kept` (`kept_record` of a marked model) it also says how many kept nodes each format ran in
    f32 ("kept_f32"): the choice stays the fastest, the count shows what it costs in kept layers."""
    import numpy as np

    feed = {m.name: np.random.default_rng(0).standard_normal([d or 1 for d in m.shape]).astype(m.dtype)
            for m in inputs}
    timings: dict[str, float] = {}
    kept_f32: dict[str, int] = {}
    for hint in ["f32", *(h for h, capability in SIXTEEN_BIT if capability in capabilities)]:
        config = compile_config(inference_precision=hint, performance_hint="LATENCY", num_threads=threads)
        try:
            compiled = core.compile_model(model, device, config)
        except Exception:  # noqa: BLE001 - a format this device cannot compile is simply not a candidate
            continue
        if kept:
            kept_f32[hint] = len(prove_kept(compiled, model, kept)["ran_f32"])
        request = compiled.create_infer_request()
        request.infer(feed)  # first run: kernel selection and caches
        runs = []
        for _ in range(SELECTION_RUNS):
            start = time.perf_counter()
            request.infer(feed)
            runs.append(time.perf_counter() - start)
        timings[hint] = round(1000 * min(runs), 3)
    chosen = min(timings, key=timings.get) if timings else "f32"
    # A lower precision has to pay for itself clearly: within the noise of a few runs, f32 (exact) stays.
    if chosen != "f32" and "f32" in timings and timings[chosen] > SELECTION_MARGIN * timings["f32"]:
        chosen = "f32"
    selection = {"chosen": chosen, "ms": timings, "runs": SELECTION_RUNS, "batch": 1, "margin": SELECTION_MARGIN}
    if kept:
        selection["kept_f32"] = kept_f32
        selection["kept_asked"] = len(kept)
    return selection


def _selection_note(precision: str, selection: Mapping[str, Any]) -> str:
    chosen = PRECISION_OF_HINT.get(selection["chosen"], selection["chosen"])
    measured = ", ".join(f"{PRECISION_OF_HINT.get(h, h)} {ms:.1f} ms" for h, ms in selection["ms"].items())
    if precision == "int8":
        return f"int8 with its float remainder in {chosen}, the fastest measured here at batch 1 ({measured})"
    if chosen == "fp32":
        return f"fp16 asked, fp32 ran: no 16-bit format is clearly (10%) faster than fp32 on this device ({measured})"
    return f"fp16 asked, {chosen} ran: the fastest 16-bit format on this device ({measured})"


def _checked_keep(keep_fp32: Sequence[str], precision: str) -> list[str]:
    """The kept node names, each once; refused where they cannot apply (int8: NNCF keeps them)."""
    if isinstance(keep_fp32, str) or any(not isinstance(n, str) or not n for n in keep_fp32):
        raise EngineError(f"keep_fp32 must be a list of ONNX node names, got {keep_fp32!r}")
    if keep_fp32 and precision == "int8":
        raise EngineError(
            "keep_fp32 applies to OpenVINO fp16/bf16 builds; for int8 keep the nodes when quantizing: "
            "prepare_graph('openvino', onnx_path, work_dir, 'int8', keep_fp32=...)"
        )
    return list(dict.fromkeys(keep_fp32))


def _kept_nodes(model, source, graph_path: Path, precision: str, keep_fp32: list[str]) -> dict:
    """{ONNX node: [OpenVINO ops]} to keep in fp32: asked for an ONNX graph (mapped here, unknown names
    refused), or recorded in a prepared IR (the names asked must be among them). None at fp32 and int8."""
    if precision not in KEEPS_FP32:
        return {}  # fp32 is all f32 already; int8 was refused above
    if source is not None:
        return ops_of_onnx_nodes(model, source, keep_fp32) if keep_fp32 else {}
    recorded = kept_record(model)
    missing = [n for n in keep_fp32 if n not in recorded]
    if missing:
        raise EngineError(
            f"{graph_path.name} does not keep {', '.join(repr(n) for n in missing[:5])} in fp32; prepare it with "
            f"prepare_graph('openvino', onnx_path, work_dir, '{precision}', keep_fp32=...) naming them"
        )
    return recorded


def _read_graph(ov, core, graph_path: Path, precision: str):
    """(openvino.Model, inputs, outputs, the ONNX or None for an IR) of an ONNX or an IR `.xml`; an int8
    build needs a quantized one."""
    if graph_path.suffix == ".xml":
        if not graph_path.is_file() or not graph_path.with_suffix(".bin").is_file():
            raise EngineError(f"OpenVINO IR not found: {graph_path} (and its .bin); prepare it first or check the path")
        try:
            model = core.read_model(str(graph_path))
        except Exception as exc:
            raise EngineError(f"OpenVINO cannot read the IR {graph_path}: {exc}") from exc
        if precision == "int8" and not is_quantized(model):
            raise EngineError(_not_quantized(graph_path))
        return model, io_metadata(model.inputs), io_metadata(model.outputs), None
    source = load_onnx(graph_path)
    # Checked before converting (the slow part): OpenVINO turns Q/DQ pairs into FakeQuantize.
    if precision == "int8" and not any(node.op_type in QDQ_ONNX_OPS for node in source.graph.node):
        raise EngineError(_not_quantized(graph_path))
    inputs, outputs = onnx_io_metadata(source)
    try:
        model = ov.convert_model(str(graph_path))
    except Exception as exc:
        raise EngineError(f"OpenVINO cannot convert {graph_path}: {exc}") from exc
    return model, inputs, outputs, source


def _not_quantized(graph_path: Path) -> str:
    return (
        f"{graph_path.name} has no FakeQuantize/FakeConvert op, int8 weights or Q/DQ pair: it is not a quantized "
        "model; prepare it first with "
        "calibration.prepare.prepare_graph('openvino', onnx_path, work_dir, 'int8', calibration=...)"
    )


def is_quantized(model) -> bool:
    """Whether an openvino.Model holds quantization: FakeQuantize/FakeConvert ops or int8/uint8 weights."""
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind in QUANTIZE_OP_TYPES:
            return True
        if kind == "Constant" and op.get_output_element_type(0).get_type_name() in QUANTIZED_WEIGHT_TYPES:
            return True
    return False


def save_ir(ov, model, xml: Path, *, compress_to_fp16: bool = False) -> None:
    """save_model into a temp dir beside the target, then move bin before xml into place."""
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ir-", dir=xml.parent) as tmp:
        staged = Path(tmp) / xml.name
        ov.save_model(model, str(staged), compress_to_fp16=compress_to_fp16)
        for suffix in (".bin", ".xml"):
            part = staged.with_suffix(suffix)
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, xml.with_suffix(suffix))
