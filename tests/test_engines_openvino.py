"""OpenVINO engines from the tiny multi-task ONNX: explicit inference precision, NNCF int8, blobs."""

from __future__ import annotations

import json

import pytest

from calibration.errors import CalibrationError
from calibration.prepare import prepare_graph
from engines.artifact import EngineArtifact, sidecar_path_for
from engines.errors import BackendUnavailable, EngineError
from engines.files import sha256_file
from tests.engine_fixtures import max_abs_error, relative_error

# The shared fixtures: tiny_onnx, test_batch, reference, calibration_set, qdq_onnx.
pytest_plugins = ("tests.engine_fixtures",)

ov = pytest.importorskip("openvino")
ov_backend = pytest.importorskip("engines.openvino")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ov_engines")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ov_prepared")


@pytest.fixture(scope="module")
def fp32_engine(tiny_onnx, work_dir, out_dir):
    prepared = prepare_graph("openvino", tiny_onnx, work_dir, "fp32")
    return ov_backend.build(prepared.path, out_dir, precision="fp32", metadata=prepared.metadata)


@pytest.fixture(scope="module")
def nncf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("nncf_cache")


@pytest.fixture(scope="module")
def int8_prepared(tiny_onnx, work_dir, calibration_set, nncf_cache):
    pytest.importorskip("nncf")
    return prepare_graph("openvino", tiny_onnx, work_dir, "int8", calibration=calibration_set, cache=nncf_cache)


@pytest.fixture(scope="module")
def int8_engine(int8_prepared, out_dir):
    return ov_backend.build(int8_prepared.path, out_dir, precision="int8", metadata=int8_prepared.metadata)


def test_fp32_really_runs_f32(fp32_engine, test_batch, reference):
    # Set explicitly and read back: a bf16/fp16-capable CPU would otherwise run this "fp32" model lower.
    assert fp32_engine.metadata["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert fp32_engine.metadata["config"]["PERFORMANCE_HINT"] == "LATENCY"
    assert fp32_engine.precision_executed == "fp32" == fp32_engine.metadata["inference_precision"]
    assert set(fp32_engine.metadata["runtime_precisions"]) <= {"f32", "i32", "i64", "u8", "boolean", "?"}
    blob = [p for p in fp32_engine.extra_paths if p.suffix == ".blob"]
    assert len(blob) == 1 and blob[0].stat().st_size > 0
    with ov_backend.load(fp32_engine.path) as runner:
        assert runner.blob == blob[0] and runner.notes == []
        assert runner.precision_executed == "fp32"  # read back from the imported compiled model
        outputs = runner.infer({"image": test_batch})
        runner.infer({"image": test_batch[:1]})
        assert len(runner.timings) == 2
    assert max(max_abs_error(outputs, reference).values()) < 1e-4


def test_fp16_is_close_and_says_what_ran(tiny_onnx, work_dir, out_dir, test_batch, reference):
    prepared = prepare_graph("openvino", tiny_onnx, work_dir, "fp16")
    assert prepared.path == tiny_onnx  # OpenVINO compresses the weights itself, on saving the IR
    artifact = ov_backend.build(prepared.path, out_dir, precision="fp16", export_blob=False, metadata=prepared.metadata)
    assert artifact.extra_paths == (artifact.path.with_suffix(".bin"),)
    assert artifact.precision_executed == artifact.metadata["inference_precision"]
    # "fp16" runs the fastest format measured here: f32 and each 16-bit format the device offers were timed.
    selection = artifact.metadata["inference_precision_selection"]
    offered = {"bf16": "BF16", "f16": "FP16"}
    assert set(selection["ms"]) <= {"f32", *(h for h, c in offered.items() if c in artifact.metadata["capabilities"])}
    assert "f32" in selection["ms"] and artifact.metadata["config"]["INFERENCE_PRECISION_HINT"] == selection["chosen"]
    ms = selection["ms"]
    if selection["chosen"] != "f32":  # a 16-bit format only when clearly faster than f32
        assert ms[selection["chosen"]] <= 0.9 * ms["f32"] and ms[selection["chosen"]] == min(ms.values())
    ran = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}[selection["chosen"]]
    assert artifact.precision_executed == ran and artifact.notes[0].startswith(f"fp16 asked, {ran} ran")
    with ov_backend.load(artifact.path) as runner:
        outputs = runner.infer({"image": test_batch})
    errors = relative_error(outputs, reference)
    assert max(errors.values()) < (3e-2 if ran == "bf16" else 5e-3), errors


def test_bf16_request_is_explicit(tiny_onnx, tmp_path):
    prepared = prepare_graph("openvino", tiny_onnx, tmp_path, "bf16")
    assert prepared.path == tiny_onnx and list(tmp_path.iterdir()) == []
    artifact = ov_backend.build(prepared.path, tmp_path, precision="bf16", export_blob=False)
    if "BF16" in artifact.metadata["capabilities"]:
        assert artifact.precision_executed == "bf16"
    else:
        assert artifact.precision_executed == "fp32" and "no BF16 support" in artifact.notes[0]


def test_int8_prepares_an_nncf_ir(int8_prepared, work_dir, tiny_onnx, calibration_set):
    assert int8_prepared.path == work_dir / "nncf" / "tiny_mtl.xml" and int8_prepared.is_ir
    assert [p.suffix for p in int8_prepared.paths] == [".xml", ".bin"] and all(p.is_file() for p in int8_prepared.paths)
    model = ov.Core().read_model(str(int8_prepared.path))
    from engines.openvino.build import is_quantized

    assert is_quantized(model) and any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    meta = int8_prepared.metadata
    assert meta["source_sha256"] == sha256_file(tiny_onnx) and meta["prepared_sha256"] == sha256_file(int8_prepared.path)
    assert meta["prepared_bin_sha256"] == sha256_file(int8_prepared.path.with_suffix(".bin"))
    assert meta["calibration_fingerprint"] == calibration_set.fingerprint() and meta["calibration_samples"] == 16
    assert any("heads" in name for name in meta["nncf"]["ignored_names"])


def test_int8_has_int8_kernels_and_keeps_heads_in_float(int8_engine, test_batch, reference):
    assert int8_engine.precision_executed == "int8"
    assert int8_engine.path.name == "tiny_mtl.int8.xml"
    assert EngineArtifact.load(int8_engine.path).metadata["nncf"]["subset_size"] == 16  # reached the sidecar
    int8_layers = int8_engine.metadata["int8_layers"]
    assert any("qkv" in name for name in int8_layers) and any("stem" in name for name in int8_layers)
    assert not any("heads" in name for name in int8_layers)  # per-task output convs stay float
    assert int8_engine.metadata["nncf"]["subset_size"] == 16
    # Where uint8 x int8 saturates (no VNNI), NNCF keeps every layer's weights on 7 bits.
    from engines.cpu import int8_saturates

    assert int8_engine.metadata["nncf"]["overflow_fix"] == ("enable" if int8_saturates() else "first_layer_only")
    with ov_backend.load(int8_engine.path) as runner:
        outputs = runner.infer({"image": test_batch})
        assert runner.precision_executed == "int8" and runner.runtime["int8_layers"]
    errors = relative_error(outputs, reference)
    assert max(errors.values()) < 0.06, errors


def test_int8_rebuild_hits_the_nncf_cache(int8_engine, tiny_onnx, tmp_path, calibration_set, nncf_cache):
    assert int8_engine.metadata["nncf"]["cache"] == "miss"
    prepared = prepare_graph("openvino", tiny_onnx, tmp_path, "int8", calibration=calibration_set, cache=nncf_cache)
    assert prepared.metadata["nncf"]["cache"] == "hit"
    again = ov_backend.build(prepared.path, tmp_path, precision="int8", metadata=prepared.metadata)
    assert again.metadata["nncf"]["cache"] == "hit"
    assert again.path.with_suffix(".bin").read_bytes() == int8_engine.path.with_suffix(".bin").read_bytes()


@pytest.mark.parametrize(
    ("field", "value"),
    [("device_name", "Some Other CPU @ 9.99GHz"), ("openvino_version", "2024.0.0-00000-deadbeef")],
)
def test_blob_from_another_machine_is_refused_or_recompiled(fp32_engine, tmp_path, test_batch, reference, field, value):
    # Copy the engine, then edit its sidecar as if the blob came from another machine.
    for path in fp32_engine.paths:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    sidecar = json.loads(fp32_engine.sidecar_path.read_text())
    sidecar["metadata"][field] = value
    copy = tmp_path / fp32_engine.path.name
    sidecar_path_for(copy).write_text(json.dumps(sidecar))
    with pytest.raises(EngineError, match="rebuild the engine here"):
        ov_backend.load(copy, allow_recompile=False)
    runner = ov_backend.load(copy)
    assert runner.blob is None and "recompiled from" in runner.notes[0]
    with runner:
        assert runner.precision_executed == "fp32"
        assert max(max_abs_error(runner.infer({"image": test_batch}), reference).values()) < 1e-4


def test_threads_and_hint_are_applied(fp32_engine):
    runner = ov_backend.load(fp32_engine.path, threads=1, performance_hint="THROUGHPUT", use_blob=False)
    with runner:
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert str(runner.compiled.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")


def test_bad_arguments(tiny_onnx, tmp_path, fp32_engine):
    with pytest.raises(EngineError, match="cannot build precision 'int4'"):
        ov_backend.build(tiny_onnx, tmp_path, precision="int4")
    with pytest.raises(CalibrationError, match="int8 needs calibration"):
        prepare_graph("openvino", tiny_onnx, tmp_path, "int8")
    with pytest.raises(BackendUnavailable, match="device NPU"):
        ov_backend.build(tiny_onnx, tmp_path, device="NPU")
    with pytest.raises(EngineError, match="unknown performance hint"):
        ov_backend.build(tiny_onnx, tmp_path, performance_hint="FAST")
    with pytest.raises(EngineError, match="not found"):
        ov_backend.build(tmp_path / "missing.onnx", tmp_path)
    with pytest.raises(EngineError, match="IR not found"):
        ov_backend.build(tmp_path / "missing.xml", tmp_path)
    with pytest.raises(EngineError, match="feed names do not match"), ov_backend.load(fp32_engine.path) as runner:
        runner.infer({"input": None})


def test_unprepared_int8_is_refused(tiny_onnx, qdq_onnx, fp32_engine, tmp_path):
    hint = r"prepare it first with calibration\.prepare\.prepare_graph\('openvino', onnx_path, work_dir, 'int8'"
    with pytest.raises(EngineError, match="not a quantized model; " + hint):
        ov_backend.build(tiny_onnx, tmp_path, precision="int8")
    with pytest.raises(EngineError, match="not a quantized model"):
        ov_backend.build(fp32_engine.path, tmp_path, precision="int8")  # an fp32 IR
    assert list(tmp_path.iterdir()) == []
    # OpenVINO reads Q/DQ ONNX as FakeQuantize, so the shared Q/DQ graph passes the look.
    artifact = ov_backend.build(qdq_onnx, tmp_path, precision="int8", export_blob=False)
    assert artifact.precision_executed == "int8"


def test_ir_input_builds_like_its_onnx(fp32_engine, tmp_path, test_batch, reference):
    artifact = ov_backend.build(fp32_engine.path, tmp_path, precision="fp32", name="from_ir", export_blob=False)
    assert artifact.metadata["built_from_bin_sha256"] == sha256_file(fp32_engine.path.with_suffix(".bin"))
    assert [m.name for m in artifact.inputs] == ["image"] and [m.name for m in artifact.outputs] == ["semseg", "sal"]
    with ov_backend.load(artifact.path) as runner:
        assert max(max_abs_error(runner.infer({"image": test_batch}), reference).values()) < 1e-4
