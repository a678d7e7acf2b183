"""A stand-in for the tensorrt module and the CUDA bindings, for the backend's tests on machines without a GPU.

The fake has only the names a release has (`FakeRelease` picks which flags exist, as the stored API
names of tests/data/tensorrt_api/ say each release has them) and records what the backend does
with them: the creation flags of the network, the builder config's settings, the context's NVTX
verbosity, what was allocated and freed. It computes nothing; `run` only copies inputs to outputs.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass
class FakeRelease:
    version: str = "10.3.0"
    strongly_typed_flag: bool = True
    explicit_batch_flag: bool = True
    weak_flags: bool = True  # BuilderFlag.FP16 / INT8 (gone in TensorRT 11)
    dla_cores: int = 0


@dataclass
class Record:
    """What the backend did with the fake."""

    network_flags: list[int] = field(default_factory=list)
    config: list = field(default_factory=list)
    builds: int = 0
    timing_cache_in: list[bytes] = field(default_factory=list)
    contexts: list = field(default_factory=list)
    engines: list = field(default_factory=list)


def _enum(name: str, members: list[str]) -> type:
    return type(name, (), {m: i for i, m in enumerate(members)})


def fake_tensorrt(release: FakeRelease | None = None, *, fail_io: bool = False, refuse_address: bool = False,
                  on_execute=None):
    """(a module that stands in for tensorrt, the Record of what was done with it)."""
    release = release or FakeRelease()
    record = Record()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = release.version
    flags = (["EXPLICIT_BATCH"] if release.explicit_batch_flag else []) + (["STRONGLY_TYPED"] if release.strongly_typed_flag else [])
    trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", ["PREFER_JIT_PYTHON_PLUGINS", *flags])
    trt.BuilderFlag = _enum("BuilderFlag", ["TF32", "GPU_FALLBACK", "DIRECT_IO", *(["FP16", "INT8"] if release.weak_flags else [])])
    trt.ProfilingVerbosity = _enum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"])
    trt.MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE"])
    trt.DeviceType = _enum("DeviceType", ["GPU", "DLA"])
    trt.TensorIOMode = _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.LayerInformationFormat = _enum("LayerInformationFormat", ["ONELINE", "JSON"])
    trt.nptype = lambda dtype: np.float32

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return b"timings:" + release.version.encode()

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.pools = [], [], {}
            self.profiling_verbosity = None
            self.builder_optimization_level = 3
            self.default_device_type = trt.DeviceType.GPU
            self.DLA_core = -1
            self.timing_cache = None
            record.config.append(self)

        def add_optimization_profile(self, profile):
            self.profile = profile

        def set_flag(self, flag):
            self.flags.append(flag)

        def clear_flag(self, flag):
            self.cleared.append(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def create_timing_cache(self, data):
            record.timing_cache_in.append(bytes(data))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing_cache = cache
            return True

        def get_timing_cache(self):
            return self.timing_cache

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shape = (name, low, opt, high)

    class Builder:
        num_DLA_cores = release.dla_cores

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            record.network_flags.append(flags)
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record.builds += 1
            return b"fake plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.nvtx_verbosity = trt.ProfilingVerbosity.DETAILED  # what a DETAILED plan's context starts with
            self.addresses, self.shapes = {}, {}
            record.contexts.append(self)

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            if refuse_address:
                return False
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name):
            return self.shapes.get("image", (1, 3, 2, 2))

        def execute_async_v3(self, stream):
            if on_execute is not None:
                on_execute()
            return True

    class Inspector:
        def get_engine_information(self, fmt):
            return json.dumps({"Layers": [{"Name": "conv", "Inputs": [{"Format/Datatype": "Row major linear FP16 format"}],
                                           "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]}]})

    class Engine:
        num_io_tensors = 2

        def __init__(self):
            record.engines.append(self)

        def get_tensor_name(self, i):
            return ("image", "out")[i]

        def get_tensor_shape(self, name):
            if fail_io:
                raise RuntimeError("fake: engine I/O could not be read")
            return (-1, 3, 2, 2)

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "image" else trt.TensorIOMode.OUTPUT

        def get_tensor_profile_shape(self, name, profile):
            return ((1, 3, 2, 2), (1, 3, 2, 2), (8, 3, 2, 2))

        def create_execution_context(self):
            return Context(self)

        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine()

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt, record


class FakeCuda:
    """The backend's CUDA calls (engines.tensorrt.runner._CudaPython's interface), on host memory."""

    def __init__(self, gpu_name: str = "Orin", capability: str = "8.7"):
        self.gpu_name, self.capability = gpu_name, capability
        self.streams, self.destroyed, self.allocated, self.freed = [], [], {}, []
        self._next = 0x1000

    def device_info(self, device: int = 0):
        return {"gpu_name": self.gpu_name, "compute_capability": self.capability, "cuda_driver_version": "12.6",
                "cuda_bindings_runtime_version": "12.6", "cuda_bindings": "fake"}

    def stream(self):
        self.streams.append(f"stream{len(self.streams)}")
        return self.streams[-1]

    def stream_handle(self, stream):
        return 1

    def destroy_stream(self, stream):
        self.destroyed.append(stream)

    def synchronize(self, stream):
        pass

    def malloc(self, nbytes):
        self._next += 0x1000
        self.allocated[self._next] = nbytes
        return self._next

    def free(self, ptr):
        self.freed.append(ptr)

    def to_device(self, ptr, array, stream):
        pass

    def to_host(self, array, ptr, stream):
        array[...] = 0


def fp16_graph(path):
    """A one-Conv graph with float16 weights (what `build` takes as an fp16 graph), batch dynamic."""
    weight = numpy_helper.from_array(np.ones((3, 3, 1, 1), dtype=np.float16), "w")
    nodes = [helper.make_node("Cast", ["image"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Conv", ["x16", "w"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["out"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 2, 2])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


class TimedFakeCuda(FakeCuda):
    """FakeCuda with a GPU clock for events: a copy of n bytes takes n / 1e6 ms, an engine run 2 ms
    (1.5 ms replayed from a CUDA graph: no launch overhead); `capturable=False` makes capture fail."""

    def __init__(self, *args, capturable: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.capturable = 0.0, capturable
        self.events, self.pinned, self.freed_pinned, self.graphs, self.destroyed_graphs = [], [], [], [], []
        self.destroyed_events, self.capturing = [], False

    def run_engine(self):
        if not self.capturing:
            self.clock += 2.0

    def to_device(self, ptr, array, stream):
        assert any(array is host for _, host in self.pinned), "copied from pageable memory"
        self.clock += array.nbytes / 1e6

    def to_host(self, array, ptr, stream):
        assert any(array is host for _, host in self.pinned), "copied to pageable memory"
        self.clock += array.nbytes / 1e6
        array[...] = 1

    def event(self):
        self.events.append([None])
        return self.events[-1]

    def record(self, event, stream):
        event[0] = self.clock

    def event_synchronize(self, event):
        pass

    def elapsed_ms(self, start, end):
        return end[0] - start[0]

    def destroy_event(self, event):
        self.destroyed_events.append(event)

    def pinned_empty(self, shape, dtype):
        host = np.zeros(shape, dtype)
        self.pinned.append((id(host), host))
        return id(host), host

    def free_pinned(self, ptr):
        self.freed_pinned.append(ptr)

    def capture_graph(self, stream, enqueue):
        if not self.capturable:
            raise RuntimeError("operation not permitted when stream is capturing (cudaErrorStreamCaptureUnsupported 900)")
        self.capturing = True
        try:
            enqueue()
        finally:
            self.capturing = False
        self.graphs.append(("graph", "exec"))
        return self.graphs[-1]

    def graph_launch(self, graph, stream):
        self.clock += 1.5

    def destroy_graph(self, graph):
        self.destroyed_graphs.append(graph)
