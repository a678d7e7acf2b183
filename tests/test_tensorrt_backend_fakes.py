"""The TensorRT backend's build and runner against a fake tensorrt module and fake CUDA (tests/tensorrt_fakes.py):
what it asks of TensorRT (creation flags, config settings, NVTX verbosity, caches, DLA) and what it frees,
on machines without a GPU. The names it may use per release are the API contract test's business."""

from __future__ import annotations

import importlib

import pytest

from engines.errors import BackendUnavailable, EngineError
from engines.tensorrt import runner as trt_runner
from engines.tensorrt.runner import TensorRTRunner, trt_features
from tests.tensorrt_fakes import FakeCuda, FakeRelease, TimedFakeCuda, fake_tensorrt, fp16_graph

trt_build = importlib.import_module("engines.tensorrt.build")  # the module; the package exports its `build`


@pytest.fixture
def use_fake(monkeypatch):
    """use_fake(release, **behaviour) -> (trt, record, cuda), installed for build and runner."""

    def install(release: FakeRelease | None = None, cuda: FakeCuda | None = None, **behaviour):
        cuda = cuda or FakeCuda()
        trt, record = fake_tensorrt(release, on_execute=getattr(cuda, "run_engine", None), **behaviour)
        for module in (trt_runner, trt_build):
            monkeypatch.setattr(module, "_trt", lambda: trt)
            monkeypatch.setattr(module, "cuda_api", lambda: cuda)
        monkeypatch.setattr(trt_runner, "_polygraphy_trt", lambda: None)
        return trt, record, cuda

    return install


def build_fp16(tmp_path, **kwargs):
    graph = fp16_graph(tmp_path / "model.onnx")
    return trt_build.build(graph, tmp_path / "engines", precision="fp16", prefer_polygraphy=False, **kwargs)


# ----------------------------------------------------------------------------- fix 1: NVTX verbosity


def test_the_execution_context_runs_with_layer_name_nvtx(use_fake, tmp_path):
    trt, record, _ = use_fake()
    artifact = build_fp16(tmp_path)
    assert record.config[0].profiling_verbosity == trt.ProfilingVerbosity.DETAILED  # the inspector needs it
    with TensorRTRunner(artifact.path, prefer_polygraphy=False):
        assert record.contexts[-1].nvtx_verbosity == trt.ProfilingVerbosity.LAYER_NAMES_ONLY


def test_polygraphy_contexts_run_with_layer_name_nvtx_too(use_fake, tmp_path, monkeypatch):
    trt, record, _ = use_fake()
    artifact = build_fp16(tmp_path)

    class PolyRunner:
        is_active = False

        def __init__(self, loader):
            self.context = trt.Runtime(None).deserialize_cuda_engine(b"").create_execution_context()

        def activate(self):
            self.is_active = True

        def deactivate(self):
            self.is_active = False

    poly = type("poly", (), {"TrtRunner": PolyRunner, "EngineFromBytes": staticmethod(lambda plan: plan)})
    monkeypatch.setattr(trt_runner, "usable_polygraphy", lambda trt, prefer: (poly, ""))
    with TensorRTRunner(artifact.path):
        assert record.contexts[-1].nvtx_verbosity == trt.ProfilingVerbosity.LAYER_NAMES_ONLY


# ----------------------------------------------------------------------------- fix 3: STRONGLY_TYPED deprecated, then gone


def test_a_release_without_the_strongly_typed_flag_builds_strongly_typed(use_fake, tmp_path):
    # TensorRT 11.4 deprecates the flag ("always enabled, ignored"); a release without it (and without weak
    # typing) still builds fp16/int8, and sets no flag it does not have.
    gone = FakeRelease(version="11.9.0", strongly_typed_flag=False, explicit_batch_flag=False, weak_flags=False)
    trt, record, _ = use_fake(gone)
    features = trt_features(trt)
    assert features["strongly_typed"] and not features["strongly_typed_flag"]
    artifact = build_fp16(tmp_path)
    assert record.network_flags == [0]
    assert artifact.metadata["typing"] == "strong"


def test_the_strongly_typed_flag_is_set_where_it_exists(use_fake, tmp_path):
    trt, record, _ = use_fake(FakeRelease(version="11.4.0", explicit_batch_flag=False, weak_flags=False))
    build_fp16(tmp_path)
    assert record.network_flags == [1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED]


def test_weak_typing_without_strong_typing_is_still_weak():
    trt, _ = fake_tensorrt(FakeRelease(version="8.6.1", strongly_typed_flag=False))
    assert trt_features(trt)["strongly_typed"] is False


# ----------------------------------------------------------------------------- fix 5: a failed activation frees


def test_a_failed_activation_frees_the_engine_context_and_stream(use_fake, tmp_path):
    _, record, cuda = use_fake(fail_io=True)
    artifact = build_fp16(tmp_path)
    runner = TensorRTRunner(artifact.path, prefer_polygraphy=False)
    with pytest.raises(RuntimeError, match="engine I/O"):
        runner.activate()
    assert cuda.streams and cuda.destroyed == cuda.streams
    assert runner._engine is None and runner._context is None and runner._stream is None
    assert not runner.is_active


# ----------------------------------------------------------------------------- fix 6: addresses and CUDA checks


def test_a_refused_tensor_address_is_an_error(use_fake, tmp_path):
    import numpy as np

    use_fake(refuse_address=True)
    artifact = build_fp16(tmp_path)
    with TensorRTRunner(artifact.path, prefer_polygraphy=False) as runner:
        with pytest.raises(EngineError, match="refused the device address of tensor 'image'"):
            runner.infer({"image": np.zeros((1, 3, 2, 2), np.float32)})


def test_a_runner_made_directly_checks_cuda_before_polygraphy(use_fake, tmp_path, monkeypatch):
    use_fake()
    artifact = build_fp16(tmp_path)

    def no_gpu():
        raise BackendUnavailable("no CUDA-capable GPU is present (cudaGetDeviceCount: cudaErrorNoDevice 100)")

    class PolygraphyException(Exception):
        pass

    class PolyRunner:
        def __init__(self, loader):
            raise PolygraphyException("CUDA initialization failure")

    poly = type("poly", (), {"TrtRunner": PolyRunner, "EngineFromBytes": staticmethod(lambda plan: plan)})
    monkeypatch.setattr(trt_runner, "usable_polygraphy", lambda trt, prefer: (poly, ""))
    monkeypatch.setattr(trt_runner, "cuda_api", no_gpu)
    with pytest.raises(BackendUnavailable, match="no CUDA-capable GPU"):
        TensorRTRunner(artifact.path).activate()


# ----------------------------------------------------------------------------- fix 7: workspace and optimisation level


def test_workspace_and_optimization_level_reach_the_builder_config(use_fake, tmp_path):
    trt, record, _ = use_fake()
    artifact = build_fp16(tmp_path, workspace_mib=512, optimization_level=1)
    config = record.config[0]
    assert config.pools == {trt.MemoryPoolType.WORKSPACE: 512 << 20}
    assert config.builder_optimization_level == 1
    assert artifact.metadata["workspace_bytes"] == 512 << 20 and artifact.metadata["optimization_level"] == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"workspace_mib": 0}, "workspace_mib must be a whole number of at least 1"),
    ({"workspace_mib": 1.5}, "workspace_mib must be a whole number"),
    ({"workspace_bytes": -1}, "workspace_bytes must be a whole number"),
    ({"workspace_mib": 1, "workspace_bytes": 1}, "not both"),
    ({"optimization_level": 6}, "optimization_level must be 0 to 5"),
    ({"optimization_level": True}, "optimization_level must be 0 to 5"),
    ({"dla_core": -1}, "dla_core must be a DLA core number"),
])
def test_bad_builder_settings_are_refused_before_tensorrt_is_needed(tmp_path, kwargs, message):
    graph = fp16_graph(tmp_path / "model.onnx")
    with pytest.raises(EngineError, match=message):
        trt_build.build(graph, tmp_path / "engines", precision="fp16", **kwargs)


def test_the_build_command_passes_workspace_opt_level_and_dla(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from export.artifacts.builddir import BuildDir
    from export.cli import main as export_cli
    from export.pipeline import build as pipeline
    from export.pipeline.context import device_build_options

    seen = {}

    def fake_run_build(options, say):
        seen["options"] = options
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "run_build", fake_run_build)
    args = ["build", "--workspace", "512", "--opt-level", "2", "--layout", "split", "--dla", "heads",
            "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(export_cli, args)
    assert result.exit_code == 0, result.output
    opts = seen["options"]
    assert (opts.workspace_mib, opts.optimization_level, opts.dla) == (512, 2, "heads")
    build = BuildDir(tmp_path / "b")
    head = device_build_options("tensorrt", "head_semseg", opts, build)
    assert head == {"cache_dir": build.calibration_cache / "tensorrt", "dla_core": 0}
    assert device_build_options("tensorrt", "backbone", opts, build) == {"cache_dir": build.calibration_cache / "tensorrt"}
    assert device_build_options("onnxruntime", "head_semseg", opts, build) == {}
    for bad in (["--opt-level", "6"], ["--workspace", "0"], ["--dla", "heads"]):  # --dla needs --layout split
        assert CliRunner().invoke(export_cli, ["build", *bad, "--out", str(tmp_path / "c")]).exit_code == 2


# ----------------------------------------------------------------------------- timing cache and plan cache


def test_a_rebuild_on_the_same_device_reuses_the_plan_and_the_timing_cache(use_fake, tmp_path):
    _, record, _ = use_fake(cuda=FakeCuda("Orin", "8.7"))
    cache = tmp_path / "calibration-cache" / "tensorrt"
    build_fp16(tmp_path, cache_dir=cache)
    timing = cache / "timing-10.3.0-sm87-orin.cache"
    assert record.builds == 1 and record.timing_cache_in == [b""] and timing.read_bytes() == b"timings:10.3.0"
    again = build_fp16(tmp_path, cache_dir=cache)
    assert record.builds == 1 and any("plan cache" in n for n in again.notes)
    build_fp16(tmp_path, cache_dir=cache, optimization_level=5)  # another setting: built, from the timing cache
    assert record.builds == 2 and record.timing_cache_in[-1] == b"timings:10.3.0"


def test_another_device_gets_its_own_timing_cache_and_plans(use_fake, tmp_path):
    _, record, _ = use_fake(cuda=FakeCuda("Orin", "8.7"))
    cache = tmp_path / "cache"
    build_fp16(tmp_path, cache_dir=cache)
    use_fake(cuda=FakeCuda("NVIDIA GeForce RTX 4090", "8.9"))
    build_fp16(tmp_path, cache_dir=cache)
    assert sorted(p.name for p in cache.glob("timing-*")) == [
        "timing-10.3.0-sm87-orin.cache", "timing-10.3.0-sm89-nvidia-geforce-rtx-4090.cache"]
    assert len(list((cache / "plans").iterdir())) == 2


# ----------------------------------------------------------------------------- DLA


def test_dla_is_refused_in_one_line_on_a_device_without_it(use_fake, tmp_path):
    use_fake(FakeRelease(dla_cores=0))
    with pytest.raises(EngineError, match="no DLA core") as err:
        build_fp16(tmp_path, dla_core=0)
    assert "\n" not in str(err.value)


def test_dla_builds_for_the_core_with_gpu_fallback(use_fake, tmp_path):
    trt, record, _ = use_fake(FakeRelease(dla_cores=2))
    artifact = build_fp16(tmp_path, dla_core=1)
    config = record.config[0]
    assert config.default_device_type == trt.DeviceType.DLA and config.DLA_core == 1
    assert trt.BuilderFlag.GPU_FALLBACK in config.flags
    assert artifact.metadata["dla_core"] == 1


# ----------------------------------------------------------------------------- timing as trtexec times


def test_gpu_time_is_taken_with_cuda_events_copies_apart_from_pinned_buffers(use_fake, tmp_path):
    import numpy as np

    cuda = TimedFakeCuda()
    use_fake(cuda=cuda)
    artifact = build_fp16(tmp_path)
    image = np.ones((2, 3, 2, 2), np.float32)  # 96 bytes in, 96 out
    with TensorRTRunner(artifact.path, prefer_polygraphy=False) as runner:
        timing = runner.time_gpu({"image": image}, iterations=5, warmup=2)
    assert timing.iterations == 5 and not timing.cuda_graph
    assert timing.compute == pytest.approx([2.0] * 5)
    np.testing.assert_allclose(timing.h2d, 96 / 1e6) and np.testing.assert_allclose(timing.d2h, 96 / 1e6)
    summary = timing.summary()
    assert summary["compute_ms"]["median"] == pytest.approx(2.0) and summary["pinned_host_buffers"] and summary["clock"] == "cuda events"
    # everything the timing made is freed: pinned and device buffers, events
    assert len(cuda.freed_pinned) == len(cuda.pinned) == 2 and len(cuda.destroyed_events) == len(cuda.events) == 4


def test_cuda_graph_replays_the_enqueue_and_falls_back_when_capture_fails(use_fake, tmp_path):
    import numpy as np

    cuda = TimedFakeCuda()
    use_fake(cuda=cuda)
    artifact = build_fp16(tmp_path)
    feed = {"image": np.ones((1, 3, 2, 2), np.float32)}
    with TensorRTRunner(artifact.path, prefer_polygraphy=False) as runner:
        graphed = runner.time_gpu(feed, iterations=3, warmup=1, cuda_graph=True)
    assert graphed.cuda_graph and graphed.compute == pytest.approx([1.5] * 3) and cuda.destroyed_graphs == cuda.graphs
    cuda = TimedFakeCuda(capturable=False)
    use_fake(cuda=cuda)
    with TensorRTRunner(artifact.path, prefer_polygraphy=False) as runner:
        plain = runner.time_gpu(feed, iterations=3, warmup=1, cuda_graph=True)
        with pytest.raises(EngineError, match="iterations must be"):
            runner.time_gpu(feed, iterations=0)
    assert not plain.cuda_graph and plain.compute == pytest.approx([2.0] * 3)
    assert plain.notes and plain.notes[0].startswith("CUDA graph not used: operation not permitted")


def test_gpu_facts_read_jetson_clocks_and_power_mode(tmp_path):
    from engines.tensorrt.timing import gpu_facts

    gpu = tmp_path / "sys/class/devfreq/17000000.ga10b"
    gpu.mkdir(parents=True)
    (gpu / "cur_freq").write_text("918000000\n")
    (gpu / "max_freq").write_text("1300500000\n")
    (tmp_path / "sys/class/devfreq/3d00000.pcie").mkdir()
    (tmp_path / "var/lib/nvpmodel").mkdir(parents=True)
    (tmp_path / "var/lib/nvpmodel/status").write_text("pmode:0001 fmode:fanNull\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nvpmodel.conf").write_text("< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n< POWER_MODEL ID=1 NAME=15W >\n")
    assert gpu_facts(tmp_path, nvidia_smi="") == {
        "gpu_clock_mhz": 918, "gpu_max_clock_mhz": 1300, "gpu_clock_source": "/sys/class/devfreq/17000000.ga10b",
        "jetson_power_mode": "15W (id 1)"}
    assert gpu_facts(tmp_path / "nowhere", nvidia_smi="") == {}  # nothing readable: nothing recorded


def test_gpu_facts_read_nvidia_smi_on_a_discrete_gpu(tmp_path):
    from engines.tensorrt.timing import gpu_facts

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '1755, 2520, 10501'\n")
    smi.chmod(0o755)
    assert gpu_facts(tmp_path, nvidia_smi=str(smi)) == {
        "gpu_clock_mhz": 1755, "gpu_max_clock_mhz": 2520, "memory_clock_mhz": 10501, "gpu_clock_source": "nvidia-smi"}
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    assert gpu_facts(tmp_path, nvidia_smi=str(smi)) == {}


def test_the_sidecar_records_the_gpu_facts(use_fake, tmp_path, monkeypatch):
    use_fake()
    monkeypatch.setattr(trt_build, "gpu_facts", lambda: {"gpu_clock_mhz": 918, "jetson_power_mode": "15W (id 1)"})
    artifact = build_fp16(tmp_path)
    assert artifact.metadata["gpu_clock_mhz"] == 918 and artifact.metadata["jetson_power_mode"] == "15W (id 1)"
    assert artifact.metadata["gpu_name"] == "Orin" and artifact.metadata["compute_capability"] == "8.7"


def test_the_bench_worker_records_gpu_timing_and_facts_for_a_tensorrt_engine(use_fake, tmp_path, monkeypatch):
    import numpy as np

    from export.bench import worker
    from export.bench.options import BenchOptions

    cuda = TimedFakeCuda()
    use_fake(cuda=cuda)
    artifact = build_fp16(tmp_path)

    class Entry:
        backend, layout = "tensorrt", "single"

    monkeypatch.setattr("export.artifacts.engineset.EngineSet.read", staticmethod(lambda directory: Entry()))
    monkeypatch.setattr("export.artifacts.engineset.load_runner",
                        lambda entry, threads: TensorRTRunner(artifact.path, prefer_polygraphy=False))
    monkeypatch.setattr("engines.tensorrt.timing.gpu_facts", lambda: {"jetson_power_mode": "MAXN (id 0)"})
    spec = {"kind": "engine", "load": {"directory": str(tmp_path)}, "threads": 1, "runs": 4, "warmup": 1,
            "cuda_graph": BenchOptions(cuda_graph=True).cuda_graph}
    time, facts = worker._gpu_timer(spec)
    assert facts["gpu_name"] == "Orin" and facts["compute_capability"] == "8.7" and facts["jetson_power_mode"] == "MAXN (id 0)"
    summary = time(np.ones((1, 3, 2, 2), np.float32))
    assert summary["iterations"] == 4 and summary["cuda_graph"] and summary["compute_ms"]["median"] == pytest.approx(1.5)
    assert worker._gpu_timer({**spec, "kind": "onnx"}) == (None, {})


def test_dla_without_a_tensorrt_backend_is_refused_in_one_line(tmp_path):
    from export.errors import ExportError
    from export.pipeline.build import _check_inputs
    from export.pipeline.options import BuildOptions

    opts = BuildOptions(layout="split", dla="heads", out=str(tmp_path / "b"))
    with pytest.raises(ExportError, match="--dla heads: none of the backends built here \\(onnxruntime, openvino\\)"):
        _check_inputs(opts, [("onnxruntime", "fp16"), ("openvino", "fp16")])
    _check_inputs(opts, [("tensorrt", "backbone=fp16,heads=int8")])  # TensorRT takes it
