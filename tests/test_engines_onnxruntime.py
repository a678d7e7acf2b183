"""ONNX Runtime engines built from the tiny multi-task ONNX, run for real on the CPU provider."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.errors import CalibrationError
from calibration.prepare import prepare_graph
from engines import onnxruntime as ort_backend
from engines.artifact import EngineArtifact, sidecar_path_for
from engines.errors import BackendUnavailable, EngineError
from engines.files import sha256_file
from engines.runner import Runner
from tests.engine_fixtures import max_abs_error, relative_error

# The shared fixtures: tiny_onnx, test_batch, reference, calibration_set, qdq_onnx.
pytest_plugins = ("tests.engine_fixtures",)

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ort_engines")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ort_prepared")


def build_prepared(onnx_path, work_dir, out_dir, precision, **prepare_args):
    """The two steps of every build: calibration prepares the graph, the engine builds from it."""
    prepared = prepare_graph("onnxruntime", onnx_path, work_dir, precision, **prepare_args)
    return ort_backend.build(prepared.path, out_dir, precision=precision, metadata=prepared.metadata)


@pytest.fixture(scope="module")
def fp32_engine(tiny_onnx, work_dir, out_dir):
    return build_prepared(tiny_onnx, work_dir, out_dir, "fp32")


@pytest.fixture(scope="module")
def int8_engine(tiny_onnx, work_dir, out_dir, calibration_set):
    return build_prepared(tiny_onnx, work_dir, out_dir, "int8", calibration=calibration_set)


def test_fp32_matches_reference_and_records_timings(fp32_engine, test_batch, reference):
    assert fp32_engine.precision_requested == fp32_engine.precision_executed == "fp32"
    assert fp32_engine.sidecar_path.is_file()
    with ort_backend.load(fp32_engine.path) as runner:
        assert isinstance(runner, Runner)
        assert runner.input_names == ["image"] and runner.output_names == ["semseg", "sal"]
        outputs = runner.infer({"image": test_batch})
        single = runner.infer({"image": test_batch[:1]})  # dynamic batch
        assert len(runner.timings) == 2 and runner.last_inference_time() > 0
    assert max(max_abs_error(outputs, reference).values()) < 1e-4
    assert single["semseg"].shape == (1, 5, 32, 32)
    np.testing.assert_allclose(single["sal"], reference["sal"][:1], atol=1e-4)


def test_sidecar_format(fp32_engine):
    data = json.loads(sidecar_path_for(fp32_engine.path).read_text())
    assert data["format"] == "mtlora-engine/1" and data["backend"] == "onnxruntime"
    assert set(data["files"]) == {fp32_engine.path.name} and len(data["files"][fp32_engine.path.name]) == 64
    assert data["inputs"] == [{"name": "image", "dtype": "float32", "shape": [None, 3, 32, 32]}]
    assert [o["name"] for o in data["outputs"]] == ["semseg", "sal"]
    assert data["metadata"]["providers"] == ["CPUExecutionProvider"]
    assert data["metadata"]["source_sha256"] == data["metadata"]["built_from_sha256"] == data["files"][fp32_engine.path.name]
    loaded = EngineArtifact.load(fp32_engine.sidecar_path)
    assert loaded.path == fp32_engine.path and loaded.precision_executed == "fp32"


def test_fp32_optimized_graph(tiny_onnx, tmp_path, test_batch, reference):
    artifact = ort_backend.build(tiny_onnx, tmp_path, precision="fp32", optimize=True, threads=1)
    assert artifact.metadata["optimized_for"] == "CPUExecutionProvider"
    with ort_backend.load(artifact.path, threads=1) as runner:
        outputs = runner.infer({"image": test_batch})
    assert max(max_abs_error(outputs, reference).values()) < 1e-4


def test_fp16_graph_is_close_and_reports_what_ran(tiny_onnx, work_dir, out_dir, test_batch, reference):
    from calibration.fp16 import check_fp16_graph

    artifact = build_prepared(tiny_onnx, work_dir, out_dir, "fp16")
    assert artifact.path.name == "tiny_mtl.fp16.onnx"
    assert check_fp16_graph(artifact.path) == []
    assert artifact.metadata["source_sha256"] == sha256_file(tiny_onnx) != artifact.metadata["built_from_sha256"]
    assert artifact.metadata["keep_fp32"] == [] and "/heads.0/Conv" in artifact.metadata["fp32_nodes"]
    # The CPU provider has fp16 kernels for few ops; the artifact must say which precision really ran.
    kernels = artifact.metadata["kernels"]
    assert artifact.precision_executed == ("fp16" if kernels["fp16"] else "fp32")
    if artifact.precision_executed == "fp32":
        assert any("fp16" in note for note in artifact.notes)
    with ort_backend.load(artifact.path) as runner:
        outputs = runner.infer({"image": test_batch})
    assert all(v.dtype == np.float32 for v in outputs.values())
    errors = relative_error(outputs, reference)
    assert max(errors.values()) < 5e-3, errors
    assert max(max_abs_error(outputs, reference).values()) > 0  # it really is a different graph


def test_int8_runs_int8_kernels_and_is_close(int8_engine, tiny_onnx, calibration_set, test_batch, reference):
    import onnx

    from calibration.qdq import ACTIVATION_TYPE_KEY, check_qdq_conventions

    # ONNX Runtime's flavour: uint8 activations (its U8S8 kernels) around the signed, TensorRT-style graph.
    engine_graph = onnx.load(str(int8_engine.path))
    assert {p.key: p.value for p in engine_graph.metadata_props}[ACTIVATION_TYPE_KEY] == "uint8"
    assert check_qdq_conventions(EngineArtifact.load(int8_engine.path).metadata["signed_qdq_onnx"]) == []
    assert int8_engine.path.name == "tiny_mtl.int8.onnx"
    # The prepared graph's metadata reached the sidecar; the engine's own facts sit beside it.
    meta = EngineArtifact.load(int8_engine.path).metadata
    assert meta["calibration_fingerprint"] == calibration_set.fingerprint() and meta["calibration_method"] == "percentile"
    assert meta["source_onnx"] == str(tiny_onnx) and meta["source_sha256"] == sha256_file(tiny_onnx)
    assert meta["built_from_sha256"] == sha256_file(int8_engine.path) and "/Softmax" in meta["excluded_nodes"]
    assert int8_engine.precision_executed == "int8"
    assert int8_engine.metadata["kernels"]["int8"] >= 4
    with ort_backend.load(int8_engine.path) as runner:
        outputs = runner.infer({"image": test_batch})
    errors = relative_error(outputs, reference)
    assert max(errors.values()) < 0.05, errors


def test_int8_from_existing_qdq_onnx(tiny_onnx, qdq_onnx, tmp_path, test_batch, reference):
    prepared = prepare_graph("onnxruntime", tiny_onnx, tmp_path / "work", "int8", qdq_onnx=qdq_onnx)
    # Checked, then given uint8 activations for ONNX Runtime's kernels: the only file written.
    assert [p.relative_to(tmp_path / "work").as_posix() for p in (tmp_path / "work").rglob("*.onnx")] == \
        ["qdq_u8/tiny_mtl.onnx"]
    artifact = ort_backend.build(prepared.path, tmp_path, precision="int8", metadata=prepared.metadata)
    assert artifact.path.read_bytes() == prepared.path.read_bytes()
    assert artifact.metadata["qdq_onnx"] == str(qdq_onnx) and artifact.metadata["source_onnx"] == str(tiny_onnx)
    with ort_backend.load(artifact.path) as runner:
        assert max(relative_error(runner.infer({"image": test_batch}), reference).values()) < 0.05


def test_fp32_engine_of_a_qdq_graph_says_it_is_mixed(qdq_onnx, tmp_path):
    artifact = ort_backend.build(qdq_onnx, tmp_path, precision="fp32")
    assert artifact.precision_executed == "mixed" and artifact.metadata["kernels"]["int8"] >= 4
    assert "not fp32" in artifact.notes[0]


# ----------------------------------------------------------------------------- errors


def test_missing_and_corrupt_onnx(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        ort_backend.build(tmp_path / "nope.onnx", tmp_path)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(EngineError, match="not a readable ONNX|no nodes"):
        ort_backend.build(corrupt, tmp_path)


def test_bad_build_arguments(tiny_onnx, tmp_path):
    with pytest.raises(EngineError, match="cannot build precision 'bf16'"):
        ort_backend.build(tiny_onnx, tmp_path, precision="bf16")
    with pytest.raises(CalibrationError, match="int8 needs calibration"):
        prepare_graph("onnxruntime", tiny_onnx, tmp_path, "int8")
    with pytest.raises(CalibrationError, match="not a usable Q/DQ model"):
        prepare_graph("onnxruntime", tiny_onnx, tmp_path, "int8", qdq_onnx=tiny_onnx)
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
        ort_backend.build(tiny_onnx, tmp_path, providers="tensorrt")


def test_unprepared_graphs_are_refused(tiny_onnx, qdq_onnx, tmp_path):
    hint = r"prepare it first with calibration\.prepare\.prepare_graph\('onnxruntime', onnx_path, work_dir, '{}'"
    with pytest.raises(EngineError, match="not a Q/DQ int8 graph; " + hint.format("int8")):
        ort_backend.build(tiny_onnx, tmp_path, precision="int8")
    with pytest.raises(EngineError, match="not an fp16 graph; " + hint.format("fp16")):
        ort_backend.build(tiny_onnx, tmp_path, precision="fp16")
    with pytest.raises(EngineError, match="not an fp16 graph"):
        ort_backend.build(qdq_onnx, tmp_path, precision="fp16")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    fp16 = prepare_graph("onnxruntime", tiny_onnx, tmp_path, "fp16")
    with pytest.raises(EngineError, match="not a Q/DQ int8 graph"):
        ort_backend.build(fp16.path, tmp_path, precision="int8")
    engine_named = tmp_path / "tiny.fp16.onnx"
    engine_named.write_bytes(fp16.path.read_bytes())
    with pytest.raises(EngineError, match="would overwrite the graph"):
        ort_backend.build(engine_named, tmp_path, precision="fp16", name="tiny", optimize=True)
    assert sha256_file(engine_named) == fp16.metadata["prepared_sha256"]


def test_feed_is_checked(fp32_engine, test_batch):
    with ort_backend.load(fp32_engine.path) as runner:
        with pytest.raises(EngineError, match=r"missing \['image'\]"):
            runner.infer({"img": test_batch})
        with pytest.raises(EngineError, match="unexpected"):
            runner.infer({"image": test_batch, "extra": test_batch})
        with pytest.raises(EngineError, match="dtype float64.*astype"):
            runner.infer({"image": test_batch.astype(np.float64)})
        with pytest.raises(EngineError, match=r"shape \(3, 3, 31, 32\)"):
            runner.infer({"image": test_batch[:, :, :31]})
        with pytest.raises(EngineError, match="must be a numpy array"):
            runner.infer({"image": test_batch.tolist()})
        assert runner.timings == []  # rejected feeds never reach the backend
    with pytest.raises(EngineError, match="not active"):
        runner.infer({"image": test_batch})


def test_tampered_or_foreign_engines_are_refused(fp32_engine, tmp_path):
    copy = tmp_path / fp32_engine.path.name
    copy.write_bytes(fp32_engine.path.read_bytes())
    with pytest.raises(EngineError, match="has no sidecar"):
        ort_backend.load(copy)
    sidecar = json.loads(fp32_engine.sidecar_path.read_text())
    sidecar_path_for(copy).write_text(json.dumps(sidecar))
    assert ort_backend.load(copy).precision_executed == "fp32"
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(EngineError, match="was modified"):
        ort_backend.load(copy)
    sidecar["backend"] = "openvino"
    sidecar_path_for(copy).write_text(json.dumps(sidecar))
    with pytest.raises(EngineError, match="openvino engine, not onnxruntime"):
        ort_backend.load(copy)
    sidecar_path_for(copy).write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        ort_backend.load(copy)
