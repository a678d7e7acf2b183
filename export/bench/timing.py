"""Timing one call at a time on a shared machine: a call during which other processes (or the
hypervisor, as steal time) took more than `CONTENDED_SHARE` of a CPU is flagged as contended, and
repeated calls go on until enough quiet ones are in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_RUNS = 3  # fewest timed runs per target and batch size, whatever the time budget
CONTENDED_SHARE = 0.1  # a run is discarded when other processes took more than this share of a CPU during it


def _system_busy_s() -> float | None:
    """CPU seconds this machine's CPUs have spent busy since boot, steal time included (None without /proc)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timing:
    """One timed call: wall seconds, this process's CPU seconds, and other processes' (None if unknown)."""

    seconds: float
    own_cpu_s: float
    others_cpu_s: float | None
    contended: bool


def wait_for_quiet(max_wait_s: float, sample_s: float = 2.0, share: float = 0.25) -> float:
    """Wait until the rest of the machine uses at most `share` of a CPU (or `max_wait_s` passes); returns seconds waited.

    Meant for the benchmarking parent while no worker runs: everything busy then is someone else.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = _system_busy_s()
        time.sleep(sample_s)
        after = _system_busy_s()
        if before is None or after is None or (after - before) / sample_s <= share:
            break
    return time.perf_counter() - start


def timed_call(infer: Callable[[], Any], spare_cpus: float = 0.0) -> Timing:
    """Time one call; it is contended when other processes (or the hypervisor, as steal time) used more
    than `CONTENDED_SHARE` of a CPU beyond the `spare_cpus` this benchmark leaves free."""
    busy0, cpu0, t0 = _system_busy_s(), time.process_time(), time.perf_counter()
    infer()
    seconds, own = time.perf_counter() - t0, time.process_time() - cpu0
    busy1 = _system_busy_s()
    if busy0 is None or busy1 is None:
        return Timing(seconds, own, None, False)
    others = max(0.0, busy1 - busy0 - own)
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    contended = others - spare_cpus * seconds > CONTENDED_SHARE * seconds + 3 * tick
    return Timing(seconds, own, others, contended)


def time_runs(infer: Callable[[], Any], warmup: int, runs: int, budget_s: float,
              spare_cpus: float = 0.0, timer: Callable[..., Timing] = timed_call) -> list[Timing]:
    """Every timed call of `infer` after `warmup` untimed ones.

    Calls go on until `runs` uncontended ones are done, or `budget_s` has passed
    with at least `MIN_RUNS` uncontended ones; contended calls are retried until
    twice the budget has passed (and at least `MIN_RUNS` calls are made). `timer` times one call
    (`timed_call`, which reads other processes' CPU time from /proc/stat).
    """
    for _ in range(warmup):
        infer()
    least = min(MIN_RUNS, runs)
    timings: list[Timing] = []
    start = time.perf_counter()
    while True:
        timings.append(timer(infer, spare_cpus))
        clean = sum(not t.contended for t in timings)
        elapsed = time.perf_counter() - start
        if clean >= runs or (elapsed >= budget_s and clean >= least) or \
                (elapsed >= 2 * budget_s and len(timings) >= least):
            return timings


def latency_stats(times_s: Sequence[float], batch: int) -> dict[str, Any]:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"runs": len(ms), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "images_per_s": batch * len(ms) / (float(ms.sum()) / 1e3)}


def interleaved_latency(infers: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                        max_rounds: int | None = None, pause_s: float = 0.1,
                        timer: Callable[..., Timing] = timed_call) -> dict[str, Any]:
    """Time several callables in turn, round after round, the order rotating each round.

    A busy spell of a shared machine then slows all of them alike, so ratios of
    their medians are steadier than ratios of timings taken minutes apart. A
    round in which any call was contended (see `timed_call`) is dropped; rounds
    go on until `rounds` are kept or `max_rounds` (default 3 x rounds) were run.
    Each call is preceded by a `pause_s` sleep, so that the previous runtime's
    worker threads have stopped spinning and do not compete with the next one.
    Returns {"seconds": {name: [seconds per kept round]}, "rounds_kept", "rounds_dropped", "contended"};
    if no round was quiet, every round is kept and "contended" is true.
    """
    names = list(infers)
    for _ in range(warmup):
        for name in names:
            infers[name]()
    quiet: list[dict[str, float]] = []
    disturbed: list[dict[str, float]] = []
    limit = max_rounds or 3 * rounds
    while len(quiet) < rounds and len(quiet) + len(disturbed) < limit:
        shift = (len(quiet) + len(disturbed)) % len(names)
        timings = {}
        for name in names[shift:] + names[:shift]:
            time.sleep(pause_s)
            timings[name] = timer(infers[name])
        (disturbed if any(t.contended for t in timings.values()) else quiet).append(
            {name: t.seconds for name, t in timings.items()})
    kept = quiet or disturbed
    return {"seconds": {name: [r[name] for r in kept] for name in names}, "rounds_kept": len(kept),
            "rounds_dropped": len(disturbed) if quiet else 0, "contended": not quiet}
