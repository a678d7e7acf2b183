"""`--precision auto`: build every candidate precision, check each per task, time each here with its own
runner, and keep the fastest that passes every gate.

Candidates, per backend: fp32; every 16-bit precision the backend builds (fp16, and bf16 on OpenVINO:
which 16-bit format is fastest depends on the machine, so it is measured, not assumed); int8; and,
for each 16-bit or int8 candidate that fails a gate, the same with layers in fp32 (`<precision>+fallback`,
the build's own fallback: `pipeline.fallback`). They are built under BUILD/candidates/, checked in one pass over the evaluation set, and timed round-robin with their
own runners (`pipeline.speed`: batch `--timing-batch`, the median of several calls). The fastest that
passes is copied to engines/<backend>-<precision>, the build's result; the report lists every candidate
(latency, size, worst drop per task, verdict) and this machine's CPU flags (`AutoSelection`).
"""

from __future__ import annotations

import time

from engines.cpu import cpu_flags, cpu_model
from engines.precision import by_looseness
from engines.registry import BACKENDS
from export.artifacts.engineset import EngineSet
from export.checking.results import AutoSelection, Candidate, EngineCheck
from export.pipeline.context import BuildContext
from export.pipeline.fallback import (
    FALLBACK_SUFFIX,
    cached_fallbacks,
    fallback_applies,
    fallback_candidate,
    publish_as,
    reduced_precision,
)
from export.pipeline.speed import RUNS, engine_set_bytes, time_in_build


def candidate_precisions(backend: str) -> list[str]:
    """Every precision the backend builds, tightest first (fp32, its 16-bit precisions, int8)."""
    return list(by_looseness(BACKENDS[backend].precisions))


def candidate_precision(name: str) -> str:
    """The engine precision of a candidate's name (fp16 with the fallback is an fp16 engine)."""
    return name.removesuffix(FALLBACK_SUFFIX)


def _fallback_candidates(ctx: BuildContext, backend: str, built: dict, checks: dict, cached: dict,
                         fallbacks: list) -> None:
    """Add `<precision>+fallback` to `built`/`checks` for every reduced precision (16-bit, int8) that fails
    a gate, where the fallback applies: the same search and rebuild a build runs (`fallback_candidate`)."""
    for precision in [p for p in candidate_precisions(backend) if reduced_precision(p)]:
        entry, check = built.get(precision), checks.get(precision)
        if entry is None or check.passed:
            continue
        if not fallback_applies(ctx, precision):
            why = "--int8-fallback off" if ctx.opts.int8_fallback == "off" else "a bundle's int8 is calibrated already"
            ctx.say(f"[auto] {backend}: {precision} fails a gate; no fallback candidate ({why})")
            continue
        # Layers in fp32 pay off only while the mix beats every tighter candidate that passes.
        tighter = candidate_precisions(backend)[:candidate_precisions(backend).index(precision)]
        compare = {p: e for p, e in built.items() if p in tighter and checks[p].passed}
        outcome = fallback_candidate(ctx, entry, check, compare=compare, hit=cached.get((backend, precision)))
        fallbacks.append(outcome.record)
        if outcome.entry is not None:
            name = f"{precision}{FALLBACK_SUFFIX}"
            built[name], checks[name] = outcome.entry, outcome.check


def _note(name: str, check: EngineCheck, fallback_layers: int | None) -> str:
    notes = []
    if name.endswith(FALLBACK_SUFFIX) and fallback_layers is not None:
        notes.append(f"{fallback_layers} layer{'s' if fallback_layers != 1 else ''} in fp32")
    ran = check.engine.precision_executed
    if ran and ran != candidate_precision(name):
        notes.append(f"ran {ran}")
    failed = [f"{t} {c.name}" for t, r in check.tasks.items() for c in r.failed]
    if failed:
        notes.append("fails " + ", ".join(failed))
    return "; ".join(notes)


def run_auto(ctx: BuildContext, backends: list[str], timings: dict):
    """Build, check and time every candidate of each backend; publish the fastest passing one.

    Returns (the published engine sets, the check outcome for the report, the record for build.json)."""
    say = ctx.say
    built: dict[str, dict[str, EngineSet]] = {}
    for backend in backends:
        built[backend] = {}
        for precision in candidate_precisions(backend):
            key = f"{backend}-{precision}"
            t0 = time.perf_counter()
            built[backend][precision] = ctx.engine(backend, precision, name=key, target=ctx.build.candidate(key))
            timings[key] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    first = ctx.check([e for per in built.values() for e in per.values()]).report
    timings["check"] = round(time.perf_counter() - t0, 2)
    checks = {b: {p: first.engine(e.key) for p, e in per.items()} for b, per in built.items()}

    fallbacks: list = []
    cached = cached_fallbacks(ctx, [(b, p) for b in backends for p in built[b] if reduced_precision(p)])
    for backend in backends:
        t0 = time.perf_counter()
        _fallback_candidates(ctx, backend, built[backend], checks[backend], cached, fallbacks)
        timings[f"{backend} fallback"] = round(time.perf_counter() - t0, 2)

    candidates: list[Candidate] = []
    chosen: dict[str, str] = {}
    latency: dict[str, dict[str, float]] = {}
    for backend in backends:
        t0 = time.perf_counter()
        say(f"[auto] timing {len(built[backend])} {backend} candidates here (batch {ctx.opts.timing_batch}, "
            f"median of {RUNS} calls)")
        latency[backend] = time_in_build(ctx, built[backend])
        timings[f"{backend} timing"] = round(time.perf_counter() - t0, 2)
        passing = [n for n in built[backend] if checks[backend][n].passed]
        best = min(passing, key=latency[backend].get) if passing else None
        for name, entry in built[backend].items():
            key = f"{backend}-{candidate_precision(name)}"
            layers = next((len(f.layers) for f in fallbacks if f.engine == key and f.passed), None)
            candidates.append(Candidate(name, checks[backend][name], latency[backend][name], engine_set_bytes(entry),
                                        name == best, _note(name, checks[backend][name], layers)))
        others = ", ".join(f"{n} {ms:.3g} ms" for n, ms in latency[backend].items() if n != best)
        if best is None:
            say(f"[auto] {backend}: no candidate passes every task ({others})")
            continue
        chosen[backend] = best
        say(f"[auto] {backend}: {best} ({latency[backend][best]:.3g} ms) is the fastest candidate that passes "
            f"every task; {others}")

    published = [publish_as(ctx, built[b][n], f"{b}-{candidate_precision(n)}") for b, n in chosen.items()]
    outcome = ctx.check(published)
    # A backend with no passing candidate reports them all, so the build fails and says why.
    outcome.report.engines += [checks[b][n] for b in backends if b not in chosen for n in built[b]]
    outcome.report.fallbacks = fallbacks
    outcome.report.auto = AutoSelection(tuple(candidates), ctx.opts.timing_batch, RUNS, ctx.opts.threads,
                                        cpu_model(), cpu_flags())
    record = {"chosen": chosen, "latency_ms": latency}
    return published, outcome, record
