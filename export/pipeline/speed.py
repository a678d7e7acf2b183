"""How fast engine sets run here, for the choices a build makes (`--precision auto`, the int8 fallback's
"is it still faster than 16-bit?", "this precision is slower than that one").

Each engine set runs with its own runner (the backend's, or `SplitRunner`), the same a user gets from
`open_engine`, on one random batch. The sets are timed round-robin, one call of each in turn, so a
machine that gets busier midway slows every candidate alike; the median of each set's calls is its
latency. This is a decision helper, not a benchmark: `mtlora-export bench` measures properly
(fresh worker processes, contention checks, percentiles).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from contextlib import ExitStack

import numpy as np

from export.artifacts.engineset import EngineSet, load_runner

WARMUP = 2  # untimed calls per engine set first (allocation, lazy kernel selection)
RUNS = 7  # timed calls per engine set; the median is reported


def time_engine_sets(entries: Mapping[str, EngineSet], *, size: int, batch: int = 1, threads: int | None = None,
                     warmup: int = WARMUP, runs: int = RUNS) -> dict[str, float]:
    """{name: median milliseconds per call} for a (batch, 3, size, size) float32 input."""
    feed = {"image": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}
    times: dict[str, list[float]] = {name: [] for name in entries}
    with ExitStack() as stack:
        runners = {name: stack.enter_context(load_runner(entry, threads)) for name, entry in entries.items()}
        for _ in range(warmup):
            for runner in runners.values():
                runner.infer(feed)
        for _ in range(runs):
            for name, runner in runners.items():
                runner.infer(feed)
                times[name].append(runner.last_inference_time())
    return {name: round(1000 * statistics.median(t), 3) for name, t in times.items()}


def time_in_build(ctx, entries: Mapping[str, EngineSet]) -> dict[str, float]:
    """`time_engine_sets` as a build times: its model's input size, its --timing-batch and --threads."""
    return time_engine_sets(entries, size=ctx.info.interface.size, batch=ctx.opts.timing_batch,
                            threads=ctx.opts.threads)


def engine_set_bytes(entry: EngineSet) -> int:
    """Bytes of every engine file of the set (IR .bin and compiled blobs included, sidecars not)."""
    return sum(p.stat().st_size for a in entry.artifacts(verify=False).values() for p in a.paths if p.is_file())
