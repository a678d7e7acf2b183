"""Determinism: the same checkpoint and settings give byte-identical ONNX files and reference outputs, the
same calibration data gives the same Q/DQ scales, and engine files rebuilt from the same graph are the same
bytes (docs/reliability.md lists what is not byte-stable, and why)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.artifacts.manifest import ExportInfo
from export.pipeline.calibration_step import calibration_set
from export.pipeline.options import BuildOptions
from tests.conftest import FIXTURE


def qdq_parameters(path) -> dict[str, np.ndarray]:
    """Every scale and zero point a QuantizeLinear / DequantizeLinear node reads, by initializer name."""
    model = onnx.load(str(path))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    names = {name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
             for name in node.input[1:] if name in initializers}
    return {name: initializers[name] for name in sorted(names)}


def test_export_is_byte_identical_across_runs(ort_build, tmp_path):
    from export.onnx.exporter import export_checkpoint

    # The build's export ran in another process, earlier; same checkpoint, same settings.
    export_checkpoint(FIXTURE, tmp_path / "again")
    for name in ("model.onnx", "reference.npz", "manifest.json"):
        assert (tmp_path / "again" / name).read_bytes() == (ort_build / "export" / name).read_bytes(), name
    with np.load(tmp_path / "again" / "reference.npz") as again, np.load(ort_build / "export" / "reference.npz") as first:
        for key in first.files:
            np.testing.assert_array_equal(again[key], first[key])


def test_calibration_gives_the_same_qdq_scales(ort_build, tmp_path):
    from calibration.qdq import quantize_qdq

    info = ExportInfo.read(ort_build / "export").interface
    opts = BuildOptions(calib_samples=8)  # what the build used: 8 synthetic training images
    calibration = calibration_set(opts, info, lambda _line: None)
    assert calibration.fingerprint() == calibration_set(opts, info, lambda _line: None).fingerprint()
    fresh = quantize_qdq(ort_build / "export" / "model.onnx", tmp_path / "model.qdq.onnx", calibration)
    built = ort_build / "graphs" / "onnxruntime-int8" / "qdq" / "model.onnx"
    first, again = qdq_parameters(built), qdq_parameters(fresh)
    assert len(first) > 100 and first.keys() == again.keys()
    for name, value in first.items():
        assert value.dtype == again[name].dtype and np.array_equal(value, again[name]), name
    # byte for byte, but for the record of which engines take it (calibration.prepare rewrites the export's)
    def without_purpose(path):
        model = onnx.load(str(path))
        kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith("mtlora.graph.")]
        del model.metadata_props[:]
        for key, value in kept:
            model.metadata_props.add(key=key, value=value)
        return model.SerializeToString()

    assert without_purpose(fresh) == without_purpose(built)


def test_engines_rebuilt_from_the_same_graph_are_byte_identical(ort_build, tmp_path):
    from calibration.fp16 import to_fp16_graph
    from engines.onnxruntime.build import build as build_ort

    export = ort_build / "export" / "model.onnx"
    fp16 = [to_fp16_graph(export, tmp_path / f"fp16-{i}" / "model.onnx") for i in range(2)]
    assert fp16[0].read_bytes() == fp16[1].read_bytes()
    # ONNX Runtime's int8 engine is built from the uint8-activation flavour of the calibrated Q/DQ graph.
    qdq = ort_build / "graphs" / "onnxruntime-int8" / "qdq_u8" / "model.onnx"
    for precision, graph in (("fp32", export), ("fp16", fp16[0]), ("int8", qdq)):
        engine = build_ort(graph, tmp_path / f"ort-{precision}", precision=precision, name="model")
        built = ort_build / "engines" / f"onnxruntime-{precision}" / f"model.{precision}.onnx"
        if built.exists():
            assert engine.path.read_bytes() == built.read_bytes(), precision
        # The sidecar differs only in when it was written (and, across build directories, in paths).
        sidecar = json.loads(engine.sidecar_path.read_text())
        again = json.loads(build_ort(graph, tmp_path / f"ort-{precision}-2", precision=precision,
                                     name="model").sidecar_path.read_text())
        assert {k for k in sidecar if sidecar[k] != again[k]} <= {"created"}


def test_openvino_ir_differs_only_in_generated_names(ort_build, tmp_path):
    """OpenVINO numbers the nodes it creates from a counter global to the process, so a second build in the
    same process writes other names into the .xml and the compiled blob; the weights (.bin) are the same
    bytes, and a fresh process (one `mtlora-export build`) repeats the names too (docs/reliability.md)."""
    pytest.importorskip("openvino")
    from engines.openvino.build import build as build_ov

    export = ort_build / "export" / "model.onnx"
    first, again = (build_ov(export, tmp_path / str(i), precision="fp32", name="model") for i in range(2))
    assert [p.name for p in first.paths] == ["model.fp32.xml", "model.fp32.bin", "model.fp32.CPU.blob"]
    assert first.paths[1].read_bytes() == again.paths[1].read_bytes()
    generated = re.compile(rb'name="([A-Za-z]+)_\d+"')
    xml_first, xml_again = (generated.sub(rb'name="\1_N"', a.path.read_bytes()) for a in (first, again))
    assert xml_first == xml_again
