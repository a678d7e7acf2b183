"""Timing a TensorRT engine as trtexec reports it, and the facts of the GPU the numbers were taken on.

trtexec's numbers are GPU times from CUDA events, with the host-to-device and device-to-host copies
timed apart from the compute (its "H2D Latency", "GPU Compute Time" and "D2H Latency"), from pinned
host buffers (pageable memory makes every copy a staged, synchronous one), optionally with the
enqueue captured once in a CUDA graph and replayed (``--useCudaGraph``), which removes the launch
overhead of the engine's kernels from the host. `time_engine` does the same on an active
`TensorRTRunner`; a wall-clock time around `Runner.infer` (what the other backends report) adds the
Python, the feed checks and pageable copies.

Per iteration, on one stream::

    record e0 | H2D copies | record e1 | enqueue (or graph launch) | record e2 | D2H copies | record e3

so h2d = e0->e1, compute = e1->e2, d2h = e2->e3, each in milliseconds.

`gpu_facts` reads, where the system shows them, the clocks the numbers were taken at and, on a
Jetson, the power mode (nvpmodel): a Jetson's GPU clock depends on the mode (and on jetson_clocks),
so a time without them cannot be compared. What cannot be read is left out, never guessed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PHASES = ("h2d", "compute", "d2h")


@dataclass
class GpuTiming:
    """Per-iteration milliseconds of each phase, as trtexec reports them."""

    h2d: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    d2h: list[float] = field(default_factory=list)
    cuda_graph: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.compute)

    def summary(self) -> dict[str, Any]:
        """{phase: {mean, median, p90, p99, min, max}} in ms, plus the end-to-end total and how it was taken."""
        out: dict[str, Any] = {"iterations": self.iterations, "cuda_graph": self.cuda_graph,
                               "pinned_host_buffers": True, "clock": "cuda events"}
        totals = [sum(parts) for parts in zip(self.h2d, self.compute, self.d2h, strict=True)]
        for phase, values in (*zip(PHASES, (self.h2d, self.compute, self.d2h), strict=True), ("total", totals)):
            if values:
                v = np.asarray(values, dtype=np.float64)
                out[f"{phase}_ms"] = {"mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
                                      "p90": round(float(np.percentile(v, 90)), 4),
                                      "p99": round(float(np.percentile(v, 99)), 4),
                                      "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def time_engine(runner, feed: Mapping[str, np.ndarray], *, iterations: int = 100, warmup: int = 10,
                cuda_graph: bool = False) -> GpuTiming:
    """Time an active TensorRTRunner on `feed` as trtexec does (see the module doc)."""
    from engines.errors import EngineError

    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise EngineError(f"iterations must be a whole number of at least 1, got {iterations!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise EngineError(f"warmup must be a whole number of at least 0, got {warmup!r}")
    session = runner.timing_session(runner.check_feed(feed))
    try:
        timing = GpuTiming(cuda_graph=False)
        if cuda_graph:
            problem = session.capture()
            if problem:
                timing.notes.append(f"CUDA graph not used: {problem}")
            timing.cuda_graph = not problem
        for i in range(warmup + iterations):
            h2d, compute, d2h = session.iteration()
            if i >= warmup:
                timing.h2d.append(h2d)
                timing.compute.append(compute)
                timing.d2h.append(d2h)
        return timing
    finally:
        session.close()


class TimingSession:
    """Pinned host buffers, device buffers, events and (optionally) a CUDA graph for one feed."""

    def __init__(self, cuda, context, stream, bind, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, tuple]):
        self.cuda, self.context, self.stream = cuda, context, stream
        self.graph = None
        self.events = [cuda.event() for _ in range(4)]
        self.pinned: dict[str, tuple[int, np.ndarray]] = {}
        self.device: dict[str, int] = {}
        try:
            for name, array in inputs.items():
                host = self._pinned(name, array.shape, array.dtype)  # input shapes: set by the runner
                host[...] = array
            for name, (shape, dtype) in outputs.items():
                self._pinned(name, shape, dtype)
            for name, (_, host) in self.pinned.items():
                self.device[name] = cuda.malloc(host.nbytes)
                bind(name, self.device[name])
            self.inputs = [n for n in inputs]
            self.outputs = [n for n in outputs]
        except BaseException:
            self.close()
            raise

    def _pinned(self, name: str, shape, dtype) -> np.ndarray:
        ptr, host = self.cuda.pinned_empty(tuple(shape), np.dtype(dtype))
        self.pinned[name] = (ptr, host)
        return host

    def enqueue(self) -> None:
        from engines.errors import EngineError

        if self.graph is not None:
            self.cuda.graph_launch(self.graph, self.stream)
        elif not self.context.execute_async_v3(self.cuda.stream_handle(self.stream)):
            raise EngineError("TensorRT execution failed while timing (see the TensorRT log)")

    def capture(self) -> str:
        """Capture one enqueue in a CUDA graph ('' when done, else why not: trtexec also falls back)."""
        self.enqueue()  # the first enqueue allocates what the engine needs; capture the steady state
        self.cuda.synchronize(self.stream)
        try:
            self.graph = self.cuda.capture_graph(self.stream, self.enqueue)
        except Exception as exc:  # noqa: BLE001 - an engine that cannot be captured is timed without
            self.graph = None
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ""

    def iteration(self) -> tuple[float, float, float]:
        cuda, stream, (e0, e1, e2, e3) = self.cuda, self.stream, self.events
        cuda.record(e0, stream)
        for name in self.inputs:
            cuda.to_device(self.device[name], self.pinned[name][1], stream)
        cuda.record(e1, stream)
        self.enqueue()
        cuda.record(e2, stream)
        for name in self.outputs:
            cuda.to_host(self.pinned[name][1], self.device[name], stream)
        cuda.record(e3, stream)
        cuda.event_synchronize(e3)
        return cuda.elapsed_ms(e0, e1), cuda.elapsed_ms(e1, e2), cuda.elapsed_ms(e2, e3)

    def close(self) -> None:
        if self.graph is not None:
            self.cuda.destroy_graph(self.graph)
            self.graph = None
        for ptr in self.device.values():
            self.cuda.free(ptr)
        self.device = {}
        for ptr, _ in self.pinned.values():
            self.cuda.free_pinned(ptr)
        self.pinned = {}
        for event in self.events:
            self.cuda.destroy_event(event)
        self.events = []


# ----------------------------------------------------------------------------- GPU facts


# Jetson: the GPU's devfreq node (the name differs per module: 17000000.ga10b on Orin, 17000000.gv11b on
# Xavier, 57000000.gpu on Nano) and nvpmodel's status file.
JETSON_GPU_DEVFREQ = "sys/class/devfreq"
JETSON_GPU_NAMES = ("gpu", "ga10b", "gv11b", "gp10b", "gb10b")
NVPMODEL_STATUS = "var/lib/nvpmodel/status"
NVPMODEL_CONF = "etc/nvpmodel.conf"


def gpu_facts(root: str | Path = "/", nvidia_smi: str | None = None) -> dict[str, Any]:
    """Clocks and power mode as the system shows them: Jetson sysfs / nvpmodel, or nvidia-smi on a
    discrete GPU. Keys only for what could be read."""
    root = Path(root)
    facts: dict[str, Any] = {}
    facts.update(_jetson_gpu_clock(root))
    mode = jetson_power_mode(root)
    if mode:
        facts["jetson_power_mode"] = mode
    if "gpu_clock_mhz" not in facts:
        facts.update(_nvidia_smi_clocks(nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")))
    return facts


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _jetson_gpu_clock(root: Path) -> dict[str, Any]:
    base = root / JETSON_GPU_DEVFREQ
    try:
        nodes = sorted(p for p in base.iterdir() if p.name.split(".")[-1] in JETSON_GPU_NAMES)
    except OSError:
        return {}
    for node in nodes:
        current, highest = _read(node / "cur_freq"), _read(node / "max_freq")
        if current.isdigit():
            facts = {"gpu_clock_mhz": round(int(current) / 1e6), "gpu_clock_source": str(Path("/") / node.relative_to(root))}
            if highest.isdigit():
                facts["gpu_max_clock_mhz"] = round(int(highest) / 1e6)
            return facts
    return {}


def jetson_power_mode(root: str | Path = "/") -> str:
    """'MAXN' or '15W (id 1)': nvpmodel's current mode, named from its config; '' off a Jetson."""
    root = Path(root)
    status = _read(root / NVPMODEL_STATUS)  # "pmode:0001 fmode:..." or "pmode:0001"
    match = re.search(r"pmode:(\d+)", status)
    if not match:
        return ""
    mode_id = int(match.group(1))
    names = {int(i): n for i, n in re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)", _read(root / NVPMODEL_CONF))}
    return f"{names[mode_id]} (id {mode_id})" if mode_id in names else f"id {mode_id}"


def _nvidia_smi_clocks(executable: str | None) -> dict[str, Any]:
    if not executable:
        return {}
    try:
        done = subprocess.run([executable, "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem",
                               "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return {}
    parts = [p.strip() for p in done.stdout.strip().splitlines()[0].split(",")] if done.stdout.strip() else []
    if done.returncode != 0 or len(parts) != 3 or not all(p.isdigit() for p in parts):
        return {}
    return {"gpu_clock_mhz": int(parts[0]), "gpu_max_clock_mhz": int(parts[1]), "memory_clock_mhz": int(parts[2]),
            "gpu_clock_source": "nvidia-smi"}
