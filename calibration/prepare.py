"""The graph an engine is built from: calibration's half of "ONNX -> engine".

Engines build from a graph that already has its precision: the fp32 ONNX, the fp16 graph
(`calibration.fp16`), the Q/DQ int8 ONNX (`calibration.qdq`), or for OpenVINO int8 the NNCF-quantized
IR (`calibration.nncf_quant`). `prepare_graph` makes that graph and checks it; an engine's `build`
takes its path and never imports this package, so the dependency points calibration -> engines only::

    prepared = prepare_graph("onnxruntime", "model.onnx", "work", "int8", calibration=calibration_set)
    artifact = engines.onnxruntime.build(
        prepared.path, "engines", precision=prepared.precision, metadata=prepared.metadata
    )

| backend            | fp32 | fp16                         | bf16 | int8                           |
|--------------------|------|------------------------------|------|--------------------------------|
| onnxruntime        | ONNX | fp16 graph                   | -    | Q/DQ ONNX                      |
| tensorrt           | ONNX | fp16 graph (strongly typed)  | -    | fp16 Q/DQ ONNX (`qdq_fp16`)    |
| openvino           | ONNX | ONNX (OpenVINO compresses)   | ONNX | NNCF IR (`.xml` + `.bin`)      |

OpenVINO's fp16 and bf16 with `keep_fp32` build from an IR whose kept ops carry OpenVINO's fp32 mark
(`engines.openvino.keep`): OpenVINO chooses the 16-bit precision itself, so the graph cannot say it
with types as the fp16 graph does.

TensorRT's int8 graph is the Q/DQ ONNX with everything outside the Q/DQ pairs in fp16
(`calibration.qdq_fp16`): a strongly typed network has no fallback, so from the fp32 Q/DQ graph it
would run LayerNorm, Softmax, GELU and the residual adds in fp32.

Prepared files go to ``<work_dir>/fp16/``, ``<work_dir>/qdq/``, ``<work_dir>/qdq_fp16/``,
``<work_dir>/nncf/`` or ``<work_dir>/openvino16/`` under the source ONNX's own file name, so an engine built from one is named after
the model, not after the step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.cache import CalibrationCache
from calibration.data import CalibrationSet, as_calibration_set
from calibration.errors import CalibrationError
from calibration.fp16 import (
    KEPT_NODES_KEY,
    cast_uint8_through_float,
    check_fp16_graph,
    ensure_node_names,
    match_nodes,
    to_fp16_graph,
)
from calibration.nncf_quant import quantize_openvino
from calibration.qdq import EXCLUDED_NODES_KEY, check_qdq_conventions, quantize_qdq, to_uint8_activations
from calibration.qdq_fp16 import QDQ_FP16_OPSET, to_qdq_fp16_graph
from engines.files import load_onnx, set_onnx_metadata, sha256_file, write_atomic
from engines.graph_purpose import purpose_metadata
from engines.precision import PRECISIONS
from engines.registry import BACKENDS

FP16_DIR, QDQ_DIR, QDQ_FP16_DIR, QDQ_U8_DIR, NNCF_DIR = "fp16", "qdq", "qdq_fp16", "qdq_u8", "nncf"
OPENVINO16_DIR = "openvino16"

# Which engines build from each prepared graph (engines.graph_purpose), recorded in the graph, so that
# the TensorRT lint knows ONNX Runtime's variant from TensorRT's. The fp16 graph serves ONNX Runtime and
# strongly typed TensorRT; the signed fp32 Q/DQ graph only TensorRT 10's weak typing (and OpenVINO, from
# a bundle); TensorRT 11 takes the fp16 Q/DQ graph.
GRAPH_PURPOSES = {
    FP16_DIR: (("onnxruntime", "tensorrt"), {}),
    QDQ_DIR: (("openvino", "tensorrt-10"), {"tensorrt-11": QDQ_FP16_DIR}),
    QDQ_FP16_DIR: (("tensorrt",), {}),
    QDQ_U8_DIR: (("onnxruntime",), {"tensorrt-10": QDQ_DIR, "tensorrt-11": QDQ_FP16_DIR}),
}


@dataclass(frozen=True)
class PreparedGraph:
    """A graph ready for one backend's `build`: an ONNX, or for OpenVINO int8 an IR `.xml`.

    `metadata` (source ONNX and its SHA-256, calibration fingerprint and method, excluded nodes...) is
    meant for the engine's sidecar: pass it as `build(..., metadata=prepared.metadata)`.
    """

    path: Path
    precision: str
    backend: str
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def is_ir(self) -> bool:
        return self.path.suffix == ".xml"

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file of the graph (an IR is its `.xml` and its `.bin`)."""
        return (self.path, self.path.with_suffix(".bin")) if self.is_ir else (self.path,)


def prepare_graph(
    backend: str,
    onnx_path: str | os.PathLike,
    work_dir: str | os.PathLike,
    precision: str,
    *,
    calibration: CalibrationSet | Iterable[Mapping[str, np.ndarray]] | None = None,
    qdq_onnx: str | os.PathLike | None = None,
    keep_fp32: Sequence[str] = (),
    keep_output_layers: bool = True,
    calibration_method: str = "percentile",
    cache: CalibrationCache | str | os.PathLike | None = None,
    device: str = "CPU",
) -> PreparedGraph:
    """Make the `precision` graph of the fp32 `onnx_path` that `backend`'s `build` takes.

    fp16 (onnxruntime, tensorrt): the fp16 graph, with sensitive ops, the per-task output layers
    (`keep_output_layers`) and `keep_fp32` globs in fp32, checked with `check_fp16_graph`. int8
    (onnxruntime, tensorrt): `qdq_onnx` when given (checked against the Q/DQ conventions), else a Q/DQ
    graph calibrated on `calibration` with `calibration_method`; for tensorrt that Q/DQ graph is then
    made the fp16 Q/DQ graph (`keep_fp32` and the output layers in fp32). int8 (openvino): `qdq_onnx` when
    given, else NNCF quantization on `calibration` for `device`, saved as IR. fp32, and OpenVINO's fp16/bf16,
    are the ONNX itself; OpenVINO's fp16/bf16 with `keep_fp32` is an IR with the matched nodes marked to
    stay fp32 (OpenVINO leaves the output layers and sensitive ops to its own choice, as without keep_fp32).
    `cache` (a CalibrationCache or its directory) reuses earlier int8 results for the same inputs.
    """
    if backend not in BACKENDS:
        raise CalibrationError(
            f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)} "
            "(resolve 'auto' with engines.registry.choose_backend first)"
        )
    BACKENDS[backend].check_precision(precision)
    wanted = PRECISIONS[precision]
    if qdq_onnx is not None and not wanted.calibrated:
        raise CalibrationError(f"qdq_onnx is an int8 graph; {backend} {precision} does not take one")
    onnx_path = Path(onnx_path)
    load_onnx(onnx_path)  # a missing or unreadable ONNX fails here, whatever the precision
    metadata: dict[str, Any] = {
        "source_onnx": str(onnx_path),
        "source_sha256": sha256_file(onnx_path),
        "prepared_for": backend,
    }
    # The export's own precision is the ONNX itself; OpenVINO converts a float graph to any float itself,
    # unless nodes are kept in fp32: then it gets an IR with those nodes marked.
    openvino16 = backend == "openvino" and wanted.sixteen_bit
    # A model of several graphs takes the same globs for each: one may match nothing in this graph.
    source, kept_nodes = _openvino_kept_nodes(onnx_path, keep_fp32) if openvino16 and keep_fp32 else (None, [])
    if wanted.source or (openvino16 and not kept_nodes):
        notes = () if wanted.source else (f"OpenVINO converts the ONNX and runs it in {precision} itself",)
        return PreparedGraph(onnx_path, precision, backend, metadata, notes)
    if openvino16:
        path = _openvino_kept_ir(onnx_path, source, Path(work_dir) / OPENVINO16_DIR, keep_fp32, kept_nodes, metadata)
        return PreparedGraph(path, precision, backend, metadata)

    if cache is not None and not isinstance(cache, CalibrationCache):
        cache = CalibrationCache(cache)
    if precision == "fp16":  # fp16's own graph; another float precision built from a graph needs its branch here
        path = _fp16_graph(onnx_path, Path(work_dir) / FP16_DIR, keep_fp32, keep_output_layers, metadata)
    elif qdq_onnx is not None:
        # A calibrated Q/DQ graph (from a bundle): every backend builds int8 from it as it is, OpenVINO
        # included (it reads Q/DQ pairs as FakeQuantize), so a device needs no calibration data.
        path = _given_qdq(Path(qdq_onnx), metadata)
    elif backend == "openvino":
        path = _nncf_ir(onnx_path, Path(work_dir) / NNCF_DIR, calibration, keep_fp32, keep_output_layers, device, cache, metadata)
    else:
        path = _qdq_graph(
            onnx_path, Path(work_dir) / QDQ_DIR, calibration, keep_fp32, keep_output_layers, calibration_method, cache, metadata
        )
    if backend == "tensorrt" and wanted.calibrated:
        path = _qdq_fp16_graph(path, onnx_path, Path(work_dir) / QDQ_FP16_DIR, keep_fp32, keep_output_layers, metadata)
    if backend == "onnxruntime" and wanted.calibrated:
        if qdq_onnx is None:
            _tensorrt_int8_sibling(path, onnx_path, Path(work_dir) / QDQ_FP16_DIR, keep_fp32, keep_output_layers, metadata)
        path = _qdq_u8_graph(path, onnx_path, Path(work_dir) / QDQ_U8_DIR, metadata)
    metadata["prepared_sha256"] = sha256_file(path)
    return PreparedGraph(path, precision, backend, metadata)


def _record_purpose(path: Path, kind: str, model=None):
    """Write GRAPH_PURPOSES[kind] into the graph's metadata (and the graph, `model` or read from `path`);
    returns the model as written. Its uint8 casts are made TensorRT-buildable on the way
    (`cast_uint8_through_float`)."""
    model = model if model is not None else load_onnx(path)
    cast_uint8_through_float(model)
    for key, value in purpose_metadata(*GRAPH_PURPOSES[kind]).items():
        set_onnx_metadata(model, key, value)
    write_atomic(path, model.SerializeToString())
    return model


def _fp16_graph(onnx_path: Path, out_dir: Path, keep_fp32, keep_output_layers: bool, metadata: dict) -> Path:
    out = _output_path(onnx_path, out_dir / onnx_path.name)
    path = to_fp16_graph(onnx_path, out, keep_fp32=keep_fp32, keep_output_layers=keep_output_layers)
    model = load_onnx(path)
    _record_purpose(path, FP16_DIR, model)
    problems = check_fp16_graph(model)
    if problems:
        raise CalibrationError(f"the fp16 graph of {onnx_path.name} is not right: {'; '.join(problems[:3])}")
    metadata.update(
        keep_fp32=list(keep_fp32),
        keep_output_layers=keep_output_layers,
        fp32_nodes=_recorded_list(model, KEPT_NODES_KEY),
    )
    return path


def _given_qdq(qdq_onnx: Path, metadata: dict) -> Path:
    model = load_onnx(qdq_onnx)
    problems = check_qdq_conventions(model)
    if problems:
        raise CalibrationError(f"{qdq_onnx} is not a usable Q/DQ model: {'; '.join(problems[:3])}")
    metadata.update(qdq_onnx=str(qdq_onnx), excluded_nodes=_recorded_list(model, EXCLUDED_NODES_KEY))
    return qdq_onnx


def _qdq_graph(
    onnx_path: Path, out_dir: Path, calibration, keep_fp32, keep_output_layers: bool, method: str, cache, metadata: dict
) -> Path:
    if calibration is None:
        raise CalibrationError("int8 needs calibration data (calibration=...) or a Q/DQ ONNX (qdq_onnx=...)")
    calibration = as_calibration_set(calibration)
    hits = cache.hits if cache is not None else 0
    path = quantize_qdq(
        onnx_path,
        _output_path(onnx_path, out_dir / onnx_path.name),
        calibration,
        method=method,
        keep_fp32=keep_fp32,
        exclude_output_layers=keep_output_layers,
        cache=cache,
    )
    model = _record_purpose(path, QDQ_DIR)
    metadata.update(
        calibration_method=method,
        calibration_fingerprint=calibration.fingerprint(),
        calibration_samples=calibration.num_samples,
        calibration_cache="off" if cache is None else ("hit" if cache.hits > hits else "miss"),
        keep_fp32=list(keep_fp32),
        excluded_nodes=_recorded_list(model, EXCLUDED_NODES_KEY),
    )
    return path


def _tensorrt_qdq_fp16(qdq_path: Path, onnx_path: Path, out_dir: Path, keep_fp32, keep_output_layers: bool):
    """The Q/DQ graph with the unquantized rest in fp16 (see calibration.qdq_fp16), its purpose recorded:
    (path, model as written)."""
    path = to_qdq_fp16_graph(
        qdq_path, _output_path(onnx_path, out_dir / onnx_path.name), keep_fp32=keep_fp32, keep_output_layers=keep_output_layers
    )
    return path, _record_purpose(path, QDQ_FP16_DIR)


def _qdq_fp16_graph(qdq_path: Path, onnx_path: Path, out_dir: Path, keep_fp32, keep_output_layers: bool, metadata: dict) -> Path:
    """TensorRT's int8 graph: the Q/DQ graph with the unquantized rest in fp16 (see calibration.qdq_fp16)."""
    path, model = _tensorrt_qdq_fp16(qdq_path, onnx_path, out_dir, keep_fp32, keep_output_layers)
    metadata.update(
        qdq_fp32_onnx=str(qdq_path),
        qdq_fp32_sha256=sha256_file(qdq_path),
        int8_graph="qdq_fp16",
        qdq_fp16_opset=QDQ_FP16_OPSET,
        keep_fp32=list(keep_fp32),
        keep_output_layers=keep_output_layers,
        fp32_nodes=_recorded_list(model, KEPT_NODES_KEY),
    )
    return path


def _tensorrt_int8_sibling(qdq_path: Path, onnx_path: Path, out_dir: Path, keep_fp32, keep_output_layers: bool,
                           metadata: dict) -> None:
    """Beside ONNX Runtime's int8 graph, the fp16 Q/DQ graph TensorRT 11 would build from the same
    calibration (no calibration of its own: a conversion), so that a workstation build has a graph for
    every TensorRT release to lint and to bundle, and the lint of the uint8 graph can name it."""
    path, _ = _tensorrt_qdq_fp16(qdq_path, onnx_path, out_dir, keep_fp32, keep_output_layers)
    metadata["tensorrt_int8_graph"] = str(path)


def _qdq_u8_graph(qdq_path: Path, onnx_path: Path, out_dir: Path, metadata: dict) -> Path:
    """ONNX Runtime's int8 graph: the calibrated Q/DQ graph with uint8 activations (`to_uint8_activations`)."""
    out = _output_path(onnx_path, out_dir / onnx_path.name)
    converted = to_uint8_activations(load_onnx(qdq_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    _record_purpose(out, QDQ_U8_DIR, converted)
    metadata.update(activation_type="uint8", signed_qdq_onnx=str(qdq_path))
    return out


def _nncf_ir(
    onnx_path: Path, out_dir: Path, calibration, keep_fp32, keep_output_layers: bool, device: str, cache, metadata: dict
) -> Path:
    if calibration is None:
        raise CalibrationError("int8 needs calibration data (calibration=CalibrationSet or a list of feed dicts)")
    import openvino as ov

    from engines.openvino.build import save_ir

    calibration = as_calibration_set(calibration)
    model, info = quantize_openvino(
        onnx_path,
        calibration,
        keep_fp32=keep_fp32,
        exclude_output_layers=keep_output_layers,
        target_device=device,
        cache=cache,
    )
    xml = _output_path(onnx_path, out_dir / f"{onnx_path.stem}.xml")
    save_ir(ov, model, xml)
    metadata.update(
        nncf=info,
        calibration_method="nncf",
        calibration_fingerprint=calibration.fingerprint(),
        calibration_samples=calibration.num_samples,
        keep_fp32=list(keep_fp32),
        prepared_bin_sha256=sha256_file(xml.with_suffix(".bin")),
    )
    return xml


def _openvino_kept_nodes(onnx_path: Path, keep_fp32):
    """(the ONNX, the names of the nodes `keep_fp32` matches), named as the other backends name them."""
    source = load_onnx(onnx_path)
    ensure_node_names(source)
    return source, match_nodes(source, keep_fp32)


def _openvino_kept_ir(onnx_path: Path, source, out_dir: Path, keep_fp32, kept_nodes: list[str], metadata: dict) -> Path:
    """The IR of `onnx_path` with `kept_nodes` marked to stay fp32 (engines.openvino.keep); OpenVINO's build
    proves from the compiled model which of them did."""
    import openvino as ov

    from engines.openvino.build import save_ir
    from engines.openvino.keep import mark_kept, ops_of_onnx_nodes
    from engines.openvino.signal_stack import core_with_plugins

    xml = _output_path(onnx_path, out_dir / f"{onnx_path.stem}.xml")
    core = core_with_plugins(ov)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise CalibrationError(f"OpenVINO cannot convert {onnx_path}: {exc}") from exc
    kept = ops_of_onnx_nodes(model, source, kept_nodes)
    save_ir(ov, mark_kept(core, model, kept, out_dir), xml)
    metadata.update(
        keep_fp32=list(keep_fp32),
        fp32_nodes=kept_nodes,
        openvino_kept_ops=kept,
        prepared_sha256=sha256_file(xml),
        prepared_bin_sha256=sha256_file(xml.with_suffix(".bin")),
    )
    return xml


def _output_path(onnx_path: Path, out: Path) -> Path:
    if out.resolve() == onnx_path.resolve():
        raise CalibrationError(f"preparing {onnx_path} would overwrite it; choose a work_dir that does not hold it")
    return out


def _recorded_list(model, key: str) -> list[str]:
    value = next((p.value for p in model.metadata_props if p.key == key), None)
    return json.loads(value) if value else []
