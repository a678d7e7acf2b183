"""The yardstick per precision: a large MatMul built into each backend at each precision it builds.

numpy's fp32 sgemm says how fast this CPU multiplies fp32 matrices, which is the wrong yardstick for a
bf16 or int8 engine: against it, an OpenVINO bf16 engine shows 99-101% "of matmul" while using a
fraction of what its AMX units do. So the rate an engine row is divided by is measured with the
project's own backends: one MatMul (a (1, N, N) input times a constant (N, N) weight, the shape of a
large fully connected layer) prepared and built exactly as an engine's graph is
(`calibration.prepare.prepare_graph`, then the backend's `build`: fp32, fp16, bf16 where the backend
builds it, and int8 calibrated on random inputs), timed in a fresh worker process as every engine of
the benchmark is. Each rate is keyed by the backend and the precision that really ran
(`precision_executed`: ONNX Runtime's CPU fp16 runs fp32 kernels; OpenVINO's fp16 runs the fastest
16-bit format of the CPU), and an engine row is divided by the rate of its own backend and executed
precision (`apply_yardsticks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.bench.options import BenchOptions
from export.bench.targets import UNCHECKED, Target
from export.bench.worker import run_target

SIZE = 2048  # N: 2 N^3 = 17 GFLOP per call, tens of milliseconds at any precision on a CPU: steady state
INPUT = "a"
CALIBRATION_SAMPLES = 8  # the fewest calibration.prepare accepts for stable int8 ranges
SGEMM = "numpy sgemm fp32"  # the yardstick of a row no engine rate applies to (PyTorch, or a rate not measured)

Say = Callable[[str], None]


@dataclass(frozen=True)
class MatmulRate:
    """One backend's MatMul at one requested precision: what ran, and how fast."""

    backend: str
    precision_requested: str
    precision_executed: str
    size: int
    gflops: float | None  # 2 N^3 x calls per second (None when it failed)
    p50_ms: float | None = None
    error: str = ""

    @property
    def label(self) -> str:
        ran = "" if self.precision_executed == self.precision_requested else f" (ran {self.precision_executed})"
        return f"{self.backend} {self.precision_requested}{ran}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MatmulRate:
        return cls(str(d["backend"]), str(d["precision_requested"]), str(d["precision_executed"]), int(d["size"]),
                   None if d.get("gflops") is None else float(d["gflops"]),
                   None if d.get("p50_ms") is None else float(d["p50_ms"]), str(d.get("error", "")))


def matmul_flops(size: int) -> float:
    return 2.0 * size**3


def write_matmul_graph(path: Path, size: int, seed: int = 0) -> Path:
    """a (batch, N, N) @ w (N, N) -> c, w a constant: what a backend sees of a large fully connected layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = (np.random.default_rng(seed).standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", [INPUT, "w"], ["c"], name="matmul")], "matmul",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", size, size])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", size, size])],
        [numpy_helper.from_array(weight, "w")])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _calibration(size: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{INPUT: rng.standard_normal((1, size, size), dtype=np.float32)} for _ in range(CALIBRATION_SAMPLES)]


def build_matmul_engines(work: Path, backends: Sequence[str], size: int, threads: int | None,
                         precisions: Sequence[str] | None = None, say: Say = lambda _line: None) \
        -> list[tuple[str, str, Path | str]]:
    """(backend, precision, engine path or why it failed) for every precision each backend builds.

    The graph goes through the same preparation as an engine's; the output layer is not kept in fp32
    (`keep_output_layers=False`), since here the MatMul is the whole graph."""
    from calibration.prepare import prepare_graph
    from engines.registry import BACKENDS, get_backend

    onnx_path = write_matmul_graph(work / f"matmul{size}.onnx", size)
    built = []
    for backend in backends:
        for precision in BACKENDS[backend].precisions:
            if precisions is not None and precision not in precisions:
                continue
            key = f"{backend}-{precision}"
            say(f"[bench] matmul {size}^2: building {key}")
            try:
                prepared = prepare_graph(backend, onnx_path, work / "graphs" / key, precision,
                                         calibration=_calibration(size) if precision == "int8" else None,
                                         keep_output_layers=False)
                artifact = get_backend(backend).build(prepared.path, work / key, precision=precision, name="matmul",
                                                      metadata=prepared.metadata, threads=threads)
                built.append((backend, precision, artifact.path))
            except Exception as err:  # noqa: BLE001 - one precision that fails to build is a row, not the end
                built.append((backend, precision, f"{type(err).__name__}: {err}".splitlines()[0]))
    return built


def matmul_target(backend: str, precision: str, path: Path, size: int) -> Target:
    return Target(f"matmul {backend}-{precision}", "artifact",
                  {"backend": backend, "path": str(path), "input_shape": [size, size]},
                  backend, precision, UNCHECKED, flops_per_image=matmul_flops(size), batch_sizes=(1,))


def measure_engine_matmul(work: Path, backends: Sequence[str], opts: BenchOptions, size: int = SIZE,
                          precisions: Sequence[str] | None = None, say: Say = lambda _line: None) -> list[MatmulRate]:
    """Build the MatMul in every backend and precision and time each in its own worker (batch 1)."""
    rates = []
    for backend, precision, path in build_matmul_engines(work, backends, size, opts.threads, precisions, say):
        if not isinstance(path, Path):
            rates.append(MatmulRate(backend, precision, "", size, None, error=path))
            continue
        result = run_target(matmul_target(backend, precision, path, size), opts, input_size=size)
        if "error" in result:
            rates.append(MatmulRate(backend, precision, result.get("precision_executed") or "", size, None,
                                    error=result["error"]))
            continue
        stats = result["batches"]["1"]
        rate = MatmulRate(backend, precision, result.get("precision_executed") or precision, size,
                          matmul_flops(size) * stats["images_per_s"] / 1e9, stats["p50_ms"])
        say(f"[bench] matmul {rate.label}: {rate.gflops:.0f} GFLOP/s")
        rates.append(rate)
    return rates


def yardstick(rates: Sequence[MatmulRate], backend: str, executed: str) -> MatmulRate | None:
    """The rate an engine of `backend` that ran `executed` is measured against: the MatMul asked for that
    precision and running it, else any request that ran it (ONNX Runtime's fp16 running fp32)."""
    ran = [r for r in rates if r.backend == backend and r.precision_executed == executed and r.gflops]
    return next((r for r in ran if r.precision_requested == executed), None) or \
        (max(ran, key=lambda r: r.gflops) if ran else None)


def apply_yardsticks(result: dict[str, Any], rates: Sequence[MatmulRate]) -> None:
    """Divide each row's GFLOP/s by the MatMul rate of its own backend and executed precision
    (`fraction_of_matmul`, named by `matmul_yardstick`); `fraction_of_sgemm` keeps the fp32 sgemm one."""
    sgemm = result["machine"]["matmul"]["reference_gflops"]
    result["machine"]["engine_matmul"] = [r.to_dict() for r in rates]
    for row in result["rows"]:
        if row.get("achieved_gflops") is None:
            continue
        row["fraction_of_sgemm"] = row["achieved_gflops"] / sgemm
        own = yardstick(rates, row["backend"], row.get("precision_executed") or row["precision_requested"])
        if own is None:
            row.update(fraction_of_matmul=row["fraction_of_sgemm"], matmul_yardstick=SGEMM, matmul_gflops=sgemm)
        else:
            row.update(fraction_of_matmul=row["achieved_gflops"] / own.gflops, matmul_yardstick=own.label,
                       matmul_gflops=own.gflops)
