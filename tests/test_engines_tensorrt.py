"""TensorRT backend: the precision plan, compatibility checks, error mapping and backend choice run
everywhere; building and running engines runs only where tensorrt and a CUDA GPU exist."""

from __future__ import annotations

import json
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from calibration.prepare import prepare_graph
from engines import registry
from engines.artifact import EngineArtifact, TensorMeta, sidecar_path_for
from engines.errors import BackendUnavailable, EngineError
from engines.tensorrt import runner as trt_runner
from engines.tensorrt.build import (
    DEFAULT_BATCH,
    batch_profile,
    batch_range,
    executed_precision,
    graph_precision_problem,
    layer_precision_counts,
    opaque_layer_count,
    plan_precision,
)
from engines.tensorrt.runner import (
    batch_problem,
    check_engine_compatible,
    cuda_error,
    format_cuda_version,
    polygraphy_problem,
    version_tuple,
)
from tests.engine_fixtures import max_abs_error, relative_error

# The shared fixtures: tiny_onnx, test_batch, reference, calibration_set, qdq_onnx.
pytest_plugins = ("tests.engine_fixtures",)

TRT_OK, TRT_REASON = registry.BACKENDS["tensorrt"].available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"needs tensorrt and a CUDA GPU: {TRT_REASON}")

TRT10 = {"version": "10.8.0", "strongly_typed": True, "explicit_batch_flag": True, "fp16_flag": True, "int8_flag": True, "tf32_flag": True}
TRT11 = {"version": "11.0.0", "strongly_typed": True, "explicit_batch_flag": False, "fp16_flag": False, "int8_flag": False, "tf32_flag": True}
TRT86 = {"version": "8.6.1", "strongly_typed": False, "explicit_batch_flag": True, "fp16_flag": True, "int8_flag": True, "tf32_flag": True}


# ----------------------------------------------------------------------------- runs everywhere


def test_precision_plan_on_tensorrt_10():
    assert plan_precision("fp32", TRT10) == {"graph": "source", "strongly_typed": True, "flags": [], "clear_tf32": True}
    assert plan_precision("fp16", TRT10)["graph"] == "fp16"
    assert plan_precision("fp16", TRT10, "weak") == {"graph": "source", "strongly_typed": False, "flags": ["FP16"], "clear_tf32": True}
    # Strongly typed int8 is the fp16 Q/DQ graph; weakly typed int8 sets FP16 with INT8.
    assert plan_precision("int8", TRT10) == {"graph": "qdq_fp16", "strongly_typed": True, "flags": [], "clear_tf32": True}
    assert plan_precision("int8", TRT10, "weak") == {"graph": "qdq", "strongly_typed": False, "flags": ["FP16", "INT8"], "clear_tf32": True}


def test_precision_plan_on_tensorrt_11_is_strongly_typed_only():
    assert plan_precision("fp16", TRT11) == {"graph": "fp16", "strongly_typed": True, "flags": [], "clear_tf32": True}
    assert plan_precision("int8", TRT11)["graph"] == "qdq_fp16"
    with pytest.raises(EngineError, match="removed in TensorRT 11"):
        plan_precision("fp16", TRT11, "weak")
    with pytest.raises(EngineError, match="removed in TensorRT 11"):
        plan_precision("int8", TRT11, "weak")


def test_tf32_is_cleared_in_every_plan():
    # "Kept in fp32" must be fp32: TF32 is on by default in every builder config, so every plan clears it.
    for features in (TRT10, TRT11, TRT86):
        for precision in ("fp32", "fp16", "int8"):
            for typing in ("auto", "strong", "weak"):
                try:
                    plan = plan_precision(precision, features, typing)
                except EngineError:
                    continue
                assert plan["clear_tf32"] is True, (features["version"], precision, typing)
    assert plan_precision("fp16", {**TRT10, "tf32_flag": False})["clear_tf32"] is False  # nothing to clear


def test_precision_plan_without_strong_typing():
    assert plan_precision("fp16", TRT86) == {"graph": "source", "strongly_typed": False, "flags": ["FP16"], "clear_tf32": True}
    assert plan_precision("int8", TRT86)["flags"] == ["FP16", "INT8"]
    assert plan_precision("int8", {**TRT86, "fp16_flag": False})["flags"] == ["INT8"]
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


def test_myelin_regions_do_not_downgrade_the_precision_claim():
    # What TensorRT 10 shows for a transformer block: one Myelin layer with only its boundary tensors.
    info = {
        "Layers": [
            {"Name": "/patch_embed/Conv", "LayerType": "CaskConvolution",
             "Inputs": [{"Name": "image", "Format/Datatype": "Row major linear FP32"}],
             "Outputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32"}]},
            {"Name": "{ForeignNode[/blocks.0/norm1/LayerNormalization.../blocks.1/Add_1]}", "LayerType": "Myelin",
             "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32"}],
             "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}]},
        ]
    }
    counts, opaque = layer_precision_counts(info), opaque_layer_count(info)
    assert counts == {"fp32": 4} and opaque == 1
    int8, note = executed_precision("int8", plan_precision("int8", TRT10), counts, opaque)
    assert int8 == "int8" and "not observable" in note and "1 layer(s) are Myelin regions" in note
    assert executed_precision("fp16", plan_precision("fp16", TRT10), counts, opaque)[0] == "fp16"
    # Without opaque regions the same evidence still downgrades; with fp16 seen in an fp32 plan it is 'mixed'.
    assert executed_precision("int8", plan_precision("int8", TRT10), counts, 0) == ("fp32", "TensorRT chose no int8 layer")
    assert executed_precision("fp32", plan_precision("fp32", TRT10), {"fp32": 3, "fp16": 1}, 2)[0] == "mixed"
    renamed = {"Layers": [{"Name": "{ForeignNode[/a.../b]}", "LayerType": "Unknown"}, {"LayerType": "myelin"}, "x"]}
    assert opaque_layer_count(renamed) == 2 and opaque_layer_count({}) == 0


def test_batch_profile():
    image = TensorMeta("image", "float32", (None, 3, 32, 32))
    assert batch_profile([image], (1, 2, 8)) == {"image": ((1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))}
    with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
        batch_profile([image], (4, 2, 8))
    with pytest.raises(EngineError, match="dynamic dimensions besides the batch"):
        batch_profile([TensorMeta("image", "float32", (None, 3, None, 32))], (1, 1, 2))


def test_batch_range_from_max_batch():
    assert batch_range() == DEFAULT_BATCH == (1, 1, 8)
    assert batch_range(max_batch=4) == (1, 1, 4) and batch_range(max_batch=1) == (1, 1, 1)
    assert batch_range((2, 4, 16)) == (2, 4, 16)
    with pytest.raises(EngineError, match="not both"):
        batch_range((1, 1, 4), max_batch=4)
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(EngineError, match="max_batch must be a whole number"):
            batch_range(max_batch=bad)
    with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
        batch_range((1, 8))


def test_a_batch_outside_the_profile_says_which_range_the_engine_has():
    assert batch_problem("image", (4, 3, 32, 32), (1, 1, 4)) == ""
    assert batch_problem("image", (5, 3, 32, 32), None) == ""  # a fixed-batch input: the shape check covers it
    problem = batch_problem("image", (5, 3, 32, 32), (1, 2, 4))
    assert "input 'image' has batch 5" in problem and "built for batch 1 to 4 (opt 2)" in problem
    assert "max_batch=5" in problem and "--max-batch" in problem
    assert "batch 1 to 4" in batch_problem("image", (0, 3, 32, 32), (1, 1, 4))


def test_cuda_errors_that_mean_no_usable_gpu_make_the_backend_unavailable():
    driver = cuda_error(35, "cudaErrorInsufficientDriver", "CUDA driver version is insufficient", "cudaGetDeviceCount")
    assert isinstance(driver, BackendUnavailable) and "older than these CUDA bindings need" in str(driver)
    assert "13.x for CUDA 13" in str(driver) and "\n" not in str(driver)
    no_gpu = cuda_error(100, "cudaErrorNoDevice", "no CUDA-capable device is detected", "cudaGetDeviceCount")
    assert isinstance(no_gpu, BackendUnavailable) and "no CUDA-capable GPU" in str(no_gpu)
    for code in trt_runner.UNUSABLE_CUDA_ERRORS:
        assert isinstance(cuda_error(code, "x", "y", "z"), BackendUnavailable)
    memory = cuda_error(2, "cudaErrorMemoryAllocation", "out of memory", "cudaMalloc")
    assert type(memory) is EngineError and "cudaMalloc failed" in str(memory)


def test_auto_falls_back_when_cuda_is_present_but_unusable(monkeypatch):
    """The real probe and choice, with what this machine lacks stood in for: a tensorrt that imports,
    a driver that reports a GPU, and cuda-python whose first call fails as cuda-python 13 does on a
    CUDA 12 driver (cudaErrorInsufficientDriver, mapped by the real cuda_error)."""

    class TooNewBindings:
        def device_info(self):
            raise cuda_error(35, "cudaErrorInsufficientDriver", "CUDA driver version is insufficient", "cudaGetDeviceCount")

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(registry, "cuda_device_count", lambda: (1, "1 CUDA GPU(s)"))
    monkeypatch.setattr(trt_runner, "cuda_api", lambda: TooNewBindings())
    ok, reason = registry.BACKENDS["tensorrt"].available()
    assert not ok and "CUDA is not usable" in reason and "older than these CUDA bindings need" in reason
    name, notice = registry.choose_backend("auto")
    assert name in ("openvino", "onnxruntime")
    assert "not tensorrt: tensorrt 10.3.0 is installed but CUDA is not usable" in notice
    with pytest.raises(BackendUnavailable, match="backend tensorrt is not usable.*older than these CUDA bindings"):
        registry.choose_backend("tensorrt")


def test_real_cuda_python_without_a_usable_gpu_makes_auto_fall_back(monkeypatch):
    """cuda-python itself, on a machine whose driver cannot serve it (none here): its error must come
    out as BackendUnavailable, and 'auto' must move on. Only tensorrt's import and the driver's GPU
    count are stood in for; skipped where cuda-python is not installed or a GPU is usable."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="needs cuda-python (pip install cuda-python)")
    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess and count > 0:
        pytest.skip("this machine has a usable CUDA GPU; the unusable-driver path cannot be seen here")
    with pytest.raises(BackendUnavailable, match="cudaGetDeviceCount") as unusable:
        trt_runner._CudaPython().device_info()
    assert "\n" not in str(unusable.value)
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(registry, "cuda_device_count", lambda: (1, "1 CUDA GPU(s)"))
    trt_runner.cuda_api.cache_clear()
    name, notice = registry.choose_backend("auto")
    assert name in ("openvino", "onnxruntime") and "CUDA is not usable" in notice and str(unusable.value) in notice


def test_cuda_versions_are_formatted_alike_for_both_bindings():
    assert format_cuda_version(12060) == "12.6" and format_cuda_version(13000) == "13.0"  # cuda-python, pycuda driver
    assert format_cuda_version((12, 2, 0)) == "12.2" and format_cuda_version("12.6.85") == "12.6"  # pycuda get_version


def test_polygraphy_that_cannot_drive_tensorrt_11_is_not_used():
    assert version_tuple("0.53.4") == (0, 53, 4) and version_tuple("10.13.3.9") == (10, 13, 3, 9)
    assert version_tuple("0.49.26") < version_tuple("0.53.4") < version_tuple("0.53.6")
    assert polygraphy_problem("0.49.0", TRT10) == ""  # TensorRT 10 still has EXPLICIT_BATCH
    problem = polygraphy_problem("0.49.26", TRT11)
    assert "older than 0.53.4" in problem and "EXPLICIT_BATCH" in problem
    assert polygraphy_problem("0.53.4", TRT11) == polygraphy_problem("0.53.6", TRT11) == ""
    assert "unknown version" in polygraphy_problem("", TRT11)


def _fake_pycuda(stack: list):
    """pycuda.driver as far as _PyCuda uses it, keeping the context stack pycuda checks at exit."""
    driver = ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    class Context:
        def __init__(self, name):
            self.name = name

        def push(self):
            stack.append(self)

        @staticmethod
        def pop():
            stack.pop()

    class Allocation(int):
        def free(self):
            assert stack, "freed without a current context"

    class Stream:
        handle = 7

        def __init__(self):
            assert stack, "stream created without a current context"

        def synchronize(self):
            assert stack, "synchronized without a current context"

    def current(result=None):
        assert stack, "CUDA call without a current context"
        return result

    driver.Error, driver.Context, driver.Stream = Error, Context, Stream
    driver.init = lambda: None
    driver.Device = lambda index: SimpleNamespace(
        retain_primary_context=lambda: Context("primary"), name=lambda: "Orin", compute_capability=lambda: (8, 7)
    )
    driver.get_version = lambda: (12, 2, 0)
    driver.get_driver_version = lambda: 12060
    driver.mem_alloc = lambda n: current(Allocation(4096))
    driver.memcpy_htod_async = lambda ptr, array, stream: current()
    driver.memcpy_dtoh_async = lambda array, ptr, stream: current()
    package = ModuleType("pycuda")
    package.driver = driver
    return package, driver


def test_pycuda_fallback_leaves_no_context_pushed(monkeypatch):
    stack: list = []
    package, driver = _fake_pycuda(stack)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    cuda = trt_runner._PyCuda()
    assert stack == []
    info = cuda.device_info()
    assert info["cuda_driver_version"] == "12.6" and info["cuda_bindings_runtime_version"] == "12.2"
    assert info["cuda_bindings"].startswith("pycuda ") and info["compute_capability"] == "8.7"
    stream = cuda.stream()
    ptr = cuda.malloc(16)
    cuda.to_device(ptr, np.zeros(4, np.float32), stream)
    cuda.to_host(np.zeros(4, np.float32), ptr, stream)
    cuda.synchronize(stream)
    cuda.free(ptr)
    assert stack == []  # pycuda aborts at exit when a pushed context is left on the stack


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
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        trt_backend.build(tiny_onnx, tmp_path, precision="fp32", max_batch=4, threads=2)
    plan = tmp_path / "model.fp32.plan"
    plan.write_bytes(b"not a plan")
    EngineArtifact(backend="tensorrt", path=plan, precision_requested="fp32", precision_executed="fp32", device="cuda:0").save()
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        trt_backend.load(plan)
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        trt_backend.load(plan, threads=2)


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
    with pytest.raises(EngineError, match="is an fp32 Q/DQ graph.*needs the fp16 Q/DQ graph"):
        trt_backend.build(qdq_onnx, tmp_path, precision="int8")  # strongly typed: everything else would be fp32
    with pytest.raises(EngineError, match="give batch=.*or max_batch, not both"):
        trt_backend.build(tiny_onnx, tmp_path, precision="fp32", batch=(1, 1, 2), max_batch=2)
    assert list(tmp_path.iterdir()) == []
    fp32, qdq = onnx.load(str(tiny_onnx)), onnx.load(str(qdq_onnx))
    assert graph_precision_problem(fp32, "fp32") == graph_precision_problem(qdq, "int8", "weak") == ""
    assert "fp32 Q/DQ graph" in graph_precision_problem(qdq, "int8")
    assert graph_precision_problem(fp32, "fp16", "weak") == ""
    fp16 = onnx.load(str(prepare_graph("tensorrt", tiny_onnx, tmp_path, "fp16").path))
    assert graph_precision_problem(fp16, "fp16") == "" and graph_precision_problem(fp16, "int8")
    qdq_fp16 = onnx.load(str(prepare_graph("tensorrt", tiny_onnx, tmp_path, "int8", qdq_onnx=qdq_onnx).path))
    assert graph_precision_problem(qdq_fp16, "int8") == graph_precision_problem(qdq_fp16, "int8", "weak") == ""


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
    for key in ("tensorrt_version", "cuda_driver_version", "cuda_bindings_runtime_version", "cuda_bindings",
                "gpu_name", "compute_capability"):
        assert artifact.metadata[key]
    with trt_backend.load(artifact.path) as runner:
        outputs = runner.infer({"image": test_batch})
    assert max(max_abs_error(outputs, reference).values()) < 1e-3


@needs_trt
def test_fp16_engine(trt_backend, tiny_onnx, trt_dir, test_batch, reference):
    prepared = prepare_graph("tensorrt", tiny_onnx, trt_dir / "work", "fp16")
    artifact = trt_backend.build(prepared.path, trt_dir, precision="fp16", metadata=prepared.metadata, batch=(1, 2, 4))
    assert artifact.precision_executed == "fp16" and artifact.path.name == "tiny_mtl.fp16.plan"
    assert artifact.metadata["tf32"] is False
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
    assert artifact.metadata["int8_graph"] == "qdq_fp16" and artifact.metadata["tf32"] is False
    with trt_backend.load(artifact.path) as runner:
        outputs = runner.infer({"image": test_batch})
    assert max(relative_error(outputs, reference).values()) < 0.06


@needs_trt
def test_batch_above_the_profile_is_a_clear_error(trt_backend, tiny_onnx, tmp_path, test_batch):
    artifact = trt_backend.build(tiny_onnx, tmp_path, precision="fp32", max_batch=2)
    assert artifact.metadata["batch"] == [1, 1, 2]
    for prefer_polygraphy in (True, False):
        with trt_backend.load(artifact.path, prefer_polygraphy=prefer_polygraphy) as runner:
            assert runner.batch_ranges == {"image": (1, 1, 2)}
            with pytest.raises(EngineError, match="has batch 3, but this engine was built for batch 1 to 2"):
                runner.infer({"image": test_batch})


@needs_trt
def test_plan_with_foreign_sidecar_is_refused(trt_backend, tiny_onnx, tmp_path):
    artifact = trt_backend.build(tiny_onnx, tmp_path, precision="fp32", batch=(1, 1, 2))
    sidecar = json.loads(artifact.sidecar_path.read_text())
    sidecar["metadata"]["compute_capability"] = "5.3"
    sidecar_path_for(artifact.path).write_text(json.dumps(sidecar))
    with pytest.raises(EngineError, match="compute capability 5.3"):
        trt_backend.load(artifact.path)


@needs_trt
def test_gpu_timing_and_caches_on_a_real_gpu(trt_backend, tiny_onnx, tmp_path, test_batch):
    # What tests/test_tensorrt_backend_fakes.py checks against fakes, once on real hardware.
    prepared = prepare_graph("tensorrt", tiny_onnx, tmp_path / "work", "fp16")
    cache = tmp_path / "cache"
    first = trt_backend.build(prepared.path, tmp_path / "a", precision="fp16", batch=(1, 2, 4), cache_dir=cache,
                              workspace_mib=256, optimization_level=2)
    assert list(cache.glob("timing-*.cache")) and first.metadata["workspace_bytes"] == 256 << 20
    again = trt_backend.build(prepared.path, tmp_path / "b", precision="fp16", batch=(1, 2, 4), cache_dir=cache,
                              workspace_mib=256, optimization_level=2)
    assert any("plan cache" in n for n in again.notes)
    with trt_backend.load(again.path) as runner:
        for cuda_graph in (False, True):
            timing = runner.time_gpu({"image": test_batch[:2]}, iterations=20, warmup=5, cuda_graph=cuda_graph)
            assert timing.iterations == 20 and min(timing.compute) > 0 and min(timing.h2d) > 0
        runner.infer({"image": test_batch[:2]})  # the runner still infers after timing
