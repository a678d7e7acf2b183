"""TensorRT backend: the precision plan, compatibility checks and backend choice run everywhere;
building and running engines runs only where tensorrt and a CUDA GPU exist."""

from __future__ import annotations

import json

import pytest

from calibration.prepare import prepare_graph
from engines import registry
from engines.artifact import EngineArtifact, TensorMeta, sidecar_path_for
from engines.errors import BackendUnavailable, EngineError
from engines.tensorrt.build import (
    batch_profile,
    executed_precision,
    graph_precision_problem,
    layer_precision_counts,
    plan_precision,
)
from engines.tensorrt.runner import check_engine_compatible
from tests.engine_fixtures import max_abs_error, relative_error

# The shared fixtures: tiny_onnx, test_batch, reference, calibration_set, qdq_onnx.
pytest_plugins = ("tests.engine_fixtures",)

TRT_OK, TRT_REASON = registry.BACKENDS["tensorrt"].available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"needs tensorrt and a CUDA GPU: {TRT_REASON}")

TRT10 = {"version": "10.8.0", "strongly_typed": True, "fp16_flag": True, "int8_flag": True, "tf32_flag": True}
TRT11 = {"version": "11.0.0", "strongly_typed": True, "fp16_flag": False, "int8_flag": False, "tf32_flag": True}
TRT86 = {"version": "8.6.1", "strongly_typed": False, "fp16_flag": True, "int8_flag": True, "tf32_flag": True}


# ----------------------------------------------------------------------------- runs everywhere


def test_precision_plan_on_tensorrt_10():
    assert plan_precision("fp32", TRT10) == {"graph": "source", "strongly_typed": True, "flags": [], "clear_tf32": True}
    assert plan_precision("fp16", TRT10)["graph"] == "fp16"
    assert plan_precision("fp16", TRT10, "weak") == {"graph": "source", "strongly_typed": False, "flags": ["FP16"], "clear_tf32": False}
    assert plan_precision("int8", TRT10) == {"graph": "qdq", "strongly_typed": True, "flags": [], "clear_tf32": False}
    assert plan_precision("int8", TRT10, "weak")["flags"] == ["INT8"]


def test_precision_plan_on_tensorrt_11_is_strongly_typed_only():
    assert plan_precision("fp16", TRT11) == {"graph": "fp16", "strongly_typed": True, "flags": [], "clear_tf32": False}
    assert plan_precision("int8", TRT11)["graph"] == "qdq"
    with pytest.raises(EngineError, match="removed in TensorRT 11"):
        plan_precision("fp16", TRT11, "weak")


def test_precision_plan_without_strong_typing():
    assert plan_precision("fp16", TRT86) == {"graph": "source", "strongly_typed": False, "flags": ["FP16"], "clear_tf32": False}
    with pytest.raises(EngineError, match="no strongly typed networks"):
        plan_precision("int8", TRT86, "strong")
    with pytest.raises(EngineError, match="unknown typing"):
        plan_precision("fp16", TRT10, "loose")
    with pytest.raises(EngineError, match="cannot build precision 'bf16'"):
        plan_precision("bf16", TRT10)


def test_engine_from_another_machine_is_refused():
    built = {"tensorrt_version": "10.3.0", "compute_capability": "8.7", "gpu_name": "Orin"}
    assert check_engine_compatible(built, dict(built)) == []
    assert check_engine_compatible(built, {**built, "gpu_name": "Orin NX"}) == []  # same capability runs
    other_trt = check_engine_compatible(built, {**built, "tensorrt_version": "10.8.0"})
    assert other_trt == ["built with TensorRT 10.3.0, this machine has 10.8.0"]
    other_gpu = check_engine_compatible(built, {**built, "compute_capability": "8.9", "gpu_name": "L4"})
    assert len(other_gpu) == 1 and "compute capability 8.7 (Orin)" in other_gpu[0] and "8.9 (L4)" in other_gpu[0]


def test_executed_precision_from_inspector_json():
    trt10 = {
        "Layers": [
            {"Name": "conv", "Inputs": [{"Name": "Float/x", "Format/Datatype": "Four wide channel vectorized row major Int8 format"}],
             "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}]},
            {"Name": "ln", "Inputs": [{"Name": "y", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}], "Outputs": []},
            "a layer without details",
        ]
    }
    assert layer_precision_counts(trt10) == {"int8": 1, "fp32": 1, "fp16": 1}
    trt11 = {"Layers": [{"Inputs": [{"Format": "Row major linear", "DataType": "Half"}], "Outputs": [{"DataType": "Float"}]}]}
    assert layer_precision_counts(trt11) == {"fp16": 1, "fp32": 1}
    plan = plan_precision("int8", TRT10)
    assert executed_precision("int8", plan, {"int8": 4, "fp32": 9}) == ("int8", "")
    assert executed_precision("int8", plan, {"fp16": 3, "fp32": 9}) == ("fp16", "TensorRT chose no int8 layer")
    assert executed_precision("fp32", plan, {"fp32": 9, "fp16": 1})[0] == "mixed"
    assert executed_precision("fp16", plan, {})[1].startswith("layer precisions could not be read")


def test_batch_profile():
    image = TensorMeta("image", "float32", (None, 3, 32, 32))
    assert batch_profile([image], (1, 2, 8)) == {"image": ((1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))}
    with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
        batch_profile([image], (4, 2, 8))
    with pytest.raises(EngineError, match="dynamic dimensions besides the batch"):
        batch_profile([TensorMeta("image", "float32", (None, 3, None, 32))], (1, 1, 2))


def test_backend_table_and_choice():
    assert set(registry.BACKENDS) == {"tensorrt", "openvino", "onnxruntime"}
    for spec in registry.BACKENDS.values():
        ok, reason = spec.available()
        assert isinstance(ok, bool) and reason and "\n" not in reason
    name, notice = registry.choose_backend("auto")
    if TRT_OK:
        assert name == "tensorrt"
    else:
        assert name in ("openvino", "onnxruntime") and "not tensorrt" in notice
    with pytest.raises(EngineError, match="unknown backend 'tvm'"):
        registry.choose_backend("tvm")
    module = registry.get_backend("onnxruntime")
    assert callable(module.build) and callable(module.load)


@pytest.mark.skipif(TRT_OK, reason="checks the message given when TensorRT is missing")
def test_tensorrt_missing_is_a_clear_error(tiny_onnx, tmp_path):
    with pytest.raises(BackendUnavailable, match="not usable"):
        registry.choose_backend("tensorrt")
    with pytest.raises(BackendUnavailable):
        registry.get_backend("tensorrt")
    trt_backend = registry.get_backend("tensorrt", check=False)
    prepared = prepare_graph("tensorrt", tiny_onnx, tmp_path, "fp16")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        trt_backend.build(prepared.path, tmp_path, precision="fp16", metadata=prepared.metadata)
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        trt_backend.build(tiny_onnx, tmp_path, precision="fp16", typing="weak")  # the FP16 flag takes fp32 ONNX
    plan = tmp_path / "model.fp32.plan"
    plan.write_bytes(b"not a plan")
    EngineArtifact(backend="tensorrt", path=plan, precision_requested="fp32", precision_executed="fp32", device="cuda:0").save()
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        trt_backend.load(plan)


def test_unprepared_graphs_are_refused_before_tensorrt_is_needed(tiny_onnx, qdq_onnx, tmp_path):
    import onnx

    trt_backend = registry.get_backend("tensorrt", check=False)
    hint = r"prepare it first with calibration\.prepare\.prepare_graph\('tensorrt', onnx_path, work_dir, '{}'"
    with pytest.raises(EngineError, match="not a Q/DQ int8 graph; " + hint.format("int8")) as refused:
        trt_backend.build(tiny_onnx, tmp_path, precision="int8")
    assert not isinstance(refused.value, BackendUnavailable)  # the graph is wrong wherever TensorRT is
    with pytest.raises(EngineError, match="not an fp16 graph; " + hint.format("fp16")):
        trt_backend.build(tiny_onnx, tmp_path, precision="fp16")
    with pytest.raises(EngineError, match="not an fp16 graph"):
        trt_backend.build(qdq_onnx, tmp_path, precision="fp16", typing="strong")
    with pytest.raises(EngineError, match="not a Q/DQ int8 graph"):
        trt_backend.build(tiny_onnx, tmp_path, precision="int8", typing="weak")  # INT8 needs Q/DQ scales too
    assert list(tmp_path.iterdir()) == []
    fp32, qdq = onnx.load(str(tiny_onnx)), onnx.load(str(qdq_onnx))
    assert graph_precision_problem(fp32, "fp32") == graph_precision_problem(qdq, "int8") == ""
    assert graph_precision_problem(fp32, "fp16", "weak") == ""
    fp16 = onnx.load(str(prepare_graph("tensorrt", tiny_onnx, tmp_path, "fp16").path))
    assert graph_precision_problem(fp16, "fp16") == "" and graph_precision_problem(fp16, "int8")


# ----------------------------------------------------------------------------- needs a GPU


@pytest.fixture(scope="module")
def trt_backend():
    return registry.get_backend("tensorrt")


@pytest.fixture(scope="module")
def trt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trt_engines")


@needs_trt
def test_fp32_engine(trt_backend, tiny_onnx, trt_dir, test_batch, reference):
    artifact = trt_backend.build(tiny_onnx, trt_dir, precision="fp32", batch=(1, 2, 4))
    assert artifact.metadata["tf32"] is False and artifact.precision_executed == "fp32"
    for key in ("tensorrt_version", "cuda_runtime_version", "gpu_name", "compute_capability"):
        assert artifact.metadata[key]
    with trt_backend.load(artifact.path) as runner:
        outputs = runner.infer({"image": test_batch})
    assert max(max_abs_error(outputs, reference).values()) < 1e-3


@needs_trt
def test_fp16_engine(trt_backend, tiny_onnx, trt_dir, test_batch, reference):
    prepared = prepare_graph("tensorrt", tiny_onnx, trt_dir / "work", "fp16")
    artifact = trt_backend.build(prepared.path, trt_dir, precision="fp16", metadata=prepared.metadata, batch=(1, 2, 4))
    assert artifact.precision_executed == "fp16" and artifact.path.name == "tiny_mtl.fp16.plan"
    assert artifact.metadata["built_from_sha256"] == prepared.metadata["prepared_sha256"]
    assert artifact.metadata["source_onnx"] == str(tiny_onnx)
    with trt_backend.load(artifact.path) as runner:
        outputs = runner.infer({"image": test_batch})
    assert max(relative_error(outputs, reference).values()) < 1e-2


@needs_trt
def test_int8_engine_from_the_shared_qdq_onnx(trt_backend, tiny_onnx, qdq_onnx, trt_dir, test_batch, reference):
    prepared = prepare_graph("tensorrt", tiny_onnx, trt_dir / "work", "int8", qdq_onnx=qdq_onnx)
    artifact = trt_backend.build(prepared.path, trt_dir, precision="int8", metadata=prepared.metadata, batch=(1, 2, 4))
    assert artifact.precision_executed == "int8" and artifact.metadata["qdq_onnx"] == str(qdq_onnx)
    with trt_backend.load(artifact.path) as runner:
        outputs = runner.infer({"image": test_batch})
    assert max(relative_error(outputs, reference).values()) < 0.06


@needs_trt
def test_plan_with_foreign_sidecar_is_refused(trt_backend, tiny_onnx, tmp_path):
    artifact = trt_backend.build(tiny_onnx, tmp_path, precision="fp32", batch=(1, 1, 2))
    sidecar = json.loads(artifact.sidecar_path.read_text())
    sidecar["metadata"]["compute_capability"] = "5.3"
    sidecar_path_for(artifact.path).write_text(json.dumps(sidecar))
    with pytest.raises(EngineError, match="compute capability 5.3"):
        trt_backend.load(artifact.path)
