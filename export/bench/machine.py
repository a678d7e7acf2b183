"""Facts about the machine a benchmark ran on: CPU model and flags, library versions, load, and its
fp32 matrix-multiply rate (the yardstick for achieved FLOP rates)."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from typing import Any

import numpy as np

from engines.cpu import cpu_flags, cpu_model


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("numpy", "onnx", "onnxruntime", "openvino", "nncf", "torch"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def matmul_rate(size: int = 2048, threads: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """fp32 GFLOP/s of numpy's BLAS on a (size x size) @ (size x size) product: best and median of `repeats`.

    The BLAS thread pool is limited to `threads` (threadpoolctl, when installed),
    and the BLAS library it used is recorded.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    limit = threadpoolctl.threadpool_limits(limits=threads, user_api="blas") if threadpoolctl and threads \
        else contextlib.nullcontext()
    with limit:
        np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            times.append(time.perf_counter() - start)
        blas = [{k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                for info in (threadpoolctl.threadpool_info() if threadpoolctl else []) if info.get("user_api") == "blas"]
    flops = 2.0 * size**3
    return {"size": size, "threads": threads, "gflops": flops / min(times) / 1e9,
            "gflops_median": flops / float(np.median(times)) / 1e9, "repeats": repeats, "blas": blas}


def machine_info(threads: int) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpus_available": available_cpus(), "cpus_total": os.cpu_count(),
            "threads": threads, "flags": cpu_flags(), "platform": platform.platform(),
            "versions": library_versions()}
