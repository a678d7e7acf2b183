"""Mixed precision: when an engine set at a reduced precision (int8, fp16, bf16) fails a task's gate, keep
the fewest layers in fp32 until every task passes; when no mix pays off, take the next format that passes.

One orchestration, used by the build (`run_fallbacks`) and by `--precision auto` (`fallback_candidate`):

1. Time the failing engine set against the engine sets a mix has to beat (`compare_engines`: for int8 the
   backend's 16-bit ones, for 16-bit the tighter formats, bf16 -> fp16 -> fp32), those that pass only.
   In mode "on", a set already no faster than one of them stops here: layers in fp32 only slow it down
   (`layer_search.cannot_pay_off`).
2. Search (`layer_search.search`) with the backend's judge (`pipeline.probes`): a graph variant run here
   where there is one (int8 graphs; ONNX Runtime's fp16 graph), ranked by the error each layer adds, or
   the engine rebuilt per try, by bisection.
3. Rebuild the engine set with those layers in fp32 as candidates/<engine>+fallback and check it like any
   engine; time it again. An int8 rebuild recalibrates, so while it fails the search goes on from its
   graph (at most `ROUNDS` rebuilds).
4. Save the list as BUILD/fallback/<engine>.json (`--keep-fp32 @FILE` reads it) and in the calibration
   cache, keyed by the graphs, settings, tolerances and evaluation data that decided it (and for int8 the
   calibration data), so a later build with the same inputs skips the search.

Verdicts: "fixed" (every task passes, and the mix is faster than what it had to beat), "not faster"
(passes, but is not), "stopped" (mode "on": cannot pay off), "failed" (no mix found). In a build, a
"fixed" set takes the failing one's place; otherwise the build takes the next format that passes (the
fastest of the compare sets) and says why, except in mode "always" with a mix that passes (built for
another device, whatever the speed here). Mode "off" builds as asked.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace

from calibration.errors import CalibrationError
from engines.precision import PRECISIONS
from engines.registry import BACKENDS
from export.artifacts.engineset import EngineSet
from export.artifacts.files import write_json_atomic
from export.checking.results import EngineCheck, Fallback, FallbackLayer, Report
from export.pipeline.check import executed_by_role
from export.pipeline.context import BuildContext
from export.pipeline.layer_search import STOPS, Limits, cannot_pay_off, rank_order, search
from export.pipeline.options import KEEP_FILE_FORMAT, precisions_used, role_precisions
from export.pipeline.probes import RebuildJudge, check_value, failing_tasks, layer_record, open_judge
from export.pipeline.speed import time_in_build
from export.pipeline.steps import publish, staging_for

ROUNDS = 4  # rebuilds: the search goes on from a rebuilt engine's graph while it still fails
SEARCH_VERSION = 3  # in the cache key: a changed search makes new lists
# A try that is a graph variant run here is cheap; one that rebuilds the engine set is a build and a check.
GRAPH_LIMITS = Limits()
REBUILD_LIMITS = Limits(max_probes=24)
SIXTEEN_BIT = tuple(p.name for p in PRECISIONS.values() if p.sixteen_bit)
# The formats a mix at each reduced precision has to beat (the rows' `must_beat`, nearest first, where its
# backend builds them): the next formats a build may take instead. Loosest precision first: an engine set's
# search works on its loosest part.
MUST_BEAT = {p.name: p.must_beat for p in sorted(PRECISIONS.values(), key=lambda p: -p.looseness) if p.must_beat}
FALLBACK_FILE = "fallback.json"  # its name in a calibration cache entry
FALLBACK_SUFFIX = "+fallback"  # the name of the engine set a fallback builds: <backend>-<precision>+fallback


@dataclass
class CachedFallback:
    """A layer list from the calibration cache: {graph role: globs}, and the record of how it was found."""

    keep: dict[str, tuple[str, ...]]
    record: Fallback


@dataclass
class FallbackOutcome:
    """What a fallback made: the engine set with layers in fp32 (candidates/<key>+fallback) and its check,
    both None when none was built, and the record for the report."""

    entry: EngineSet | None
    check: EngineCheck | None
    record: Fallback


def reduced_precision(precision: str) -> str | None:
    """The precision a search puts layers of back in fp32: int8 where any part is int8, else the loosest
    16-bit part; None for fp32."""
    used = precisions_used(precision)
    return next((p for p in MUST_BEAT if p in used), None)


def _roles(entry: EngineSet, precision: str) -> list[str]:
    return [r for r, p in role_precisions(entry.precision, entry.files).items() if p == precision]


def fallback_applies(ctx: BuildContext, precision: str) -> bool:
    """Whether a failing engine set at `precision` gets a search: it has a reduced precision, the mode is
    not off, and (for int8) its graph was calibrated here, not on the workstation a bundle came from."""
    reduced = reduced_precision(precision)
    if reduced is None or ctx.opts.int8_fallback == "off":
        return False
    return not PRECISIONS[reduced].calibrated or ctx.bundle_graphs is None


# ----------------------------------------------------------------------------- one engine set


def run_fallback(ctx: BuildContext, entry: EngineSet, failed: EngineCheck, *, compare: dict[str, EngineSet],
                 start_keep: dict[str, tuple[str, ...]] | None = None) -> FallbackOutcome:
    """Search and rebuild until every task passes (see the module docstring). `compare` holds the passing
    engine sets a mix has to beat ({precision: set})."""
    say, mode = ctx.say, ctx.opts.int8_fallback
    key = entry.key
    precision = reduced_precision(entry.precision)
    mix = f"{precision}{FALLBACK_SUFFIX}"
    name = f"{key}{FALLBACK_SUFFIX}"
    started = time.perf_counter()
    tasks = failing_tasks(failed)

    def record(verdict: str, message: str, layers=(), probes: int = 0, tasks_=tasks) -> Fallback:
        return Fallback(key, verdict, message, tuple(tasks_), tuple(layers), latency, probes,
                        round(time.perf_counter() - started, 2))

    say(f"[{key}] fails its {precision} gate ({'; '.join(t.describe() for t in tasks)}): looking for the layers "
        "responsible")
    latency: dict[str, float] = {}
    if compare:
        latency.update(time_in_build(ctx, {precision: entry, **compare}))
        fastest = min(compare, key=latency.get)
        say(f"[{key}] {precision} runs {latency[precision]:.3g} ms here, {ran_as(fastest, compare)} "
            f"{latency[fastest]:.3g} ms (batch {ctx.opts.timing_batch})")
        if mode == "on" and cannot_pay_off(latency, precision, compare):
            message = (f"{precision} ({latency[precision]:.3g} ms) is no faster than {ran_as(fastest, compare)} "
                       f"({latency[fastest]:.3g} ms) here, so layers in fp32 cannot pay off: build --precision "
                       f"{fastest}, or search anyway with --int8-fallback always")
            say(f"[{key}] {message}")
            return FallbackOutcome(None, None, record("stopped", message))
    roles = _roles(entry, precision)
    keep = {role: list((start_keep or {}).get(role, ())) for role in roles}
    layers: list[FallbackLayer] = []
    probes, current, current_check, verdict, faster = 0, entry, failed, "failed", None
    kept: list = []  # the layers this search put in fp32
    stop = ""  # why a round found no layer, when one did not
    cached = sum(len(v) for v in (start_keep or {}).values())  # and a cached list's globs
    target = ctx.build.candidate(name)
    for _ in range(ROUNDS):
        graph_name = key if current is entry else name
        try:
            judge = open_judge(ctx, current, current_check, precision, roles, keep, graph_name, name, target)
            try:
                found = _search(ctx, judge, key)
            finally:
                judge.close()
        except CalibrationError as err:
            # The search is a help, not a step the build needs: its failure leaves the engine as it was.
            message = f"the layer search could not run ({err}); the {precision} engine stays as it was built"
            say(f"[{key}] {message}")
            return FallbackOutcome(None, None, record("failed", message, layers, probes))
        probes += found.probes
        if not found.chosen:
            stop = found.stop
            break
        keep = judge.keep(found.chosen, keep)
        for step in found.steps:
            layer = layer_record(step)
            say(f"[{key}] keeping {layer.node} in fp32: {layer.task} {layer.check} {layer.before:.4g} -> "
                f"{layer.after:.4g}")
            layers.append(layer)
        kept += found.chosen
        say(f"[{key}] rebuilding {precision} with {len(kept) + cached} layer(s) in fp32")
        current = ctx.engine(entry.backend, entry.precision, name=name, target=target, extra_keep=keep)
        current_check = ctx.check([current]).report.engines[0]
        if compare:
            # Timed together, so the numbers compare (the first engine set is still where it was built).
            times = time_in_build(ctx, {precision: entry, mix: current, **compare})
            latency.update(times)
            faster = cannot_pay_off(times, mix, compare) is None
        if current_check.passed:
            verdict = "fixed" if faster is not False else "not faster"
            break
        if mode == "on" and faster is False:
            verdict = "stopped"
            break
    after = {t.task: check_value(current_check, t.task, t.check) for t in tasks} if current is not entry else {}
    tasks = [replace(t, after=after.get(t.task)) for t in tasks]
    message = _message(precision, verdict, len(kept) + cached, latency, compare, stop)
    say(f"[{key}] {message}")
    result = record(verdict, message, layers, probes, tasks)
    if current is not entry and verdict in ("fixed", "not faster"):
        result = _save(ctx, entry, keep, result)
    if current is entry:
        return FallbackOutcome(None, None, result)
    return FallbackOutcome(current, current_check, result)


def _search(ctx: BuildContext, judge, key: str):
    """One round of the layer search with `judge`, its ranking said in one line."""
    def say(line: str) -> None:
        ctx.say(f"[{key}] {line}")

    limits = REBUILD_LIMITS if isinstance(judge, RebuildJudge) else GRAPH_LIMITS
    t0 = time.perf_counter()
    errors = judge.ranking()
    if errors:
        ranked = rank_order(errors)
        top = ", ".join(f"{n} ({errors[(r, n)]:.3g})" for r, n in ranked[:3])
        say(f"ranked {len(errors)} layers by the error each adds in {time.perf_counter() - t0:.1f} s; top: {top}")
    elif errors is None:
        say(f"no one-pass ranking for {judge.entry.backend}: each try rebuilds the engine set (at most "
            f"{limits.max_probes})")
    return search(judge, judge.candidates, limits, say, errors=errors)


def ran_note(precision: str, compare: dict[str, EngineSet]) -> str:
    """What `precision`'s engine set of `compare` ran, as ' (ran fp32 here)', where that differs (else ''):
    a CPU without bf16 or fp16 runs them in fp32, and "prefer bf16" alone would promise a speed-up it
    does not give."""
    ran = sorted(set(executed_by_role(compare[precision]).values()) - {"", None}) if precision in compare else []
    return f" (ran {'/'.join(ran)} here)" if ran and ran != [precision] else ""


def ran_as(precision: str, compare: dict[str, EngineSet]) -> str:
    """`precision` with its `ran_note`."""
    return precision + ran_note(precision, compare)


def _message(precision: str, verdict: str, kept: int, latency: dict[str, float], compare: dict, stop: str = "") -> str:
    layers = f"{kept} layer{'s' if kept != 1 else ''} in fp32"
    mix = f"{precision}{FALLBACK_SUFFIX}"
    fastest = min(compare, key=latency.get) if compare and all(c in latency for c in compare) else None
    speed = ""
    if mix in latency and fastest is not None:
        speed = (f"; {latency[mix]:.3g} ms vs {precision} {latency.get(precision, float('nan')):.3g} ms and "
                 f"{fastest} {latency[fastest]:.3g} ms")
    if verdict == "fixed":
        return f"every task passes with {layers}{speed}"
    if verdict == "not faster":
        return f"{precision} with {layers} is no faster than {fastest} here{speed}: prefer {ran_as(fastest, compare)}"
    if verdict == "stopped":
        return (f"still failing with {layers} and no faster than {fastest}{speed}: stopped; "
                f"prefer {ran_as(fastest, compare)}")
    why = STOPS[stop] if stop and not kept else f"could not make every task pass ({layers} tried)"
    if stop == "cannot help" and kept:  # the last round's own finding: no set of further layers would do
        why += f"; {STOPS[stop]}"
    return f"{why}{speed}; the {precision} engine stays as it was built"


# ----------------------------------------------------------------------------- the list, cached and saved


def _cache_key(ctx: BuildContext, backend: str, precision: str) -> str:
    from calibration.cache import cache_key
    from engines.files import sha256_file

    graphs = {role: sha256_file(ctx.export_dir / f) for role, f in ctx.info.graph_files.items()}
    opts = ctx.opts
    reduced = reduced_precision(precision)
    settings = {"kind": f"{reduced}-fallback", "search": SEARCH_VERSION, "backend": backend, "precision": precision,
                "keep_fp32": list(opts.keep_fp32),
                "keep_fp32_roles": {r: list(g) for r, g in opts.keep_fp32_roles.items()},
                "tolerances": ctx.tolerances.overrides, "eval_data": opts.eval_data, "eval_samples": opts.eval_samples,
                "max_batch": opts.max_batch}
    if PRECISIONS[reduced].calibrated:
        settings["calib_method"] = opts.calib_method
        calibration = ctx.calibration().fingerprint()
    else:
        calibration = ""  # 16-bit needs no calibration data, and must not ask for it
    return cache_key(json.dumps(graphs, sort_keys=True).encode(), calibration, settings)


def _save(ctx: BuildContext, entry: EngineSet, keep: dict[str, list[str]], record: Fallback) -> Fallback:
    """Write BUILD/fallback/<engine>.json and store the same bytes in the calibration cache."""
    from calibration.cache import CalibrationCache

    path = ctx.build.fallback_file(entry.key)
    record = replace(record, file=str(path))
    data = {"format": KEEP_FILE_FORMAT, "engine": entry.key, "backend": entry.backend,
            "precision": entry.precision, "layout": ctx.info.layout,
            "keep_fp32": {role: globs for role, globs in keep.items() if globs},
            "fallback": record.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    CalibrationCache(ctx.build.calibration_cache).store(_cache_key(ctx, entry.backend, entry.precision),
                                                        {FALLBACK_FILE: path}, info={"engine": entry.key})
    ctx.say(f"[{entry.key}] layer list saved to {path}; reuse it with --keep-fp32 @{path}")
    return record


def cached_fallbacks(ctx: BuildContext, pairs) -> dict[tuple[str, str], CachedFallback]:
    """The cached layer lists of this build's engine sets with a reduced precision, by (backend, precision)."""
    from calibration.cache import CalibrationCache

    cache = CalibrationCache(ctx.build.calibration_cache)
    found = {}
    for backend, precision in pairs:
        if not fallback_applies(ctx, precision):
            continue
        hit = cache.lookup(_cache_key(ctx, backend, precision))
        if hit is None:
            continue
        try:
            data = json.loads(hit[FALLBACK_FILE].read_text())
            keep = {str(r): tuple(str(g) for g in globs) for r, globs in data["keep_fp32"].items()}
            record = Fallback.from_dict(data["fallback"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged entry is a miss
        path = ctx.build.fallback_file(f"{backend}-{precision}")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, data)
        count = sum(len(v) for v in keep.values())
        ctx.say(f"[{backend}-{precision}] the {reduced_precision(precision)} fallback of an earlier build applies: "
                f"{count} layer(s) in fp32 ({path})")
        found[(backend, precision)] = CachedFallback(keep, replace(record, cached=True, file=str(path)))
    return found


# ----------------------------------------------------------------------------- shared by build and auto


def compare_engines(ctx: BuildContext, entry: EngineSet, entries: list[EngineSet], report: Report) \
        -> dict[str, EngineSet]:
    """The engine sets of `entry`'s backend a mix has to beat: for int8 its 16-bit ones, for 16-bit the
    tighter formats (bf16: fp16, fp32; fp16: fp32). The build's own when it has them, else built as
    candidates/<backend>-<precision> (not part of the build's results); only those that pass every gate,
    since a faster engine that fails is no reason to give up on a mix."""
    precision = reduced_precision(entry.precision)
    backend = entry.backend
    out = {}
    for other in MUST_BEAT[precision]:
        if other not in BACKENDS[backend].precisions:
            continue
        own = next((e for e in entries if e.backend == backend and e.precision == other), None)
        key = f"{backend}-{other}"
        engine = own or ctx.engine(backend, other, name=key, target=ctx.build.candidate(key))
        check = report.engine(key) if own is not None else None
        if check is None:
            check = ctx.check([engine]).report.engines[0]
        if check.passed:
            out[other] = engine
        else:
            ctx.say(f"[{key}] fails its gate too, so {precision} is not measured against it")
    return out


def fallback_candidate(ctx: BuildContext, entry: EngineSet, check: EngineCheck, *, compare: dict[str, EngineSet],
                       hit: CachedFallback | None, applied: bool = False) -> FallbackOutcome:
    """The fallback of a failing engine set: a cached list first (rebuilt as candidates/<key>+fallback
    unless `applied`, i.e. the set was built with it already), then the search from it."""
    if hit is not None and not applied:
        name = f"{entry.key}{FALLBACK_SUFFIX}"
        rebuilt = ctx.engine(entry.backend, entry.precision, name=name, target=ctx.build.candidate(name),
                             extra_keep=hit.keep)
        result = ctx.check([rebuilt]).report.engines[0]
        if result.passed:
            return FallbackOutcome(rebuilt, result, hit.record)
    return run_fallback(ctx, entry, check, compare=compare, start_keep=hit.keep if hit else None)


def publish_as(ctx: BuildContext, entry: EngineSet, key: str) -> EngineSet:
    """Copy a candidate engine set (and its prepared graphs, which bundles take) to engines/<key>."""
    build = ctx.build
    target = build.engine(key)
    if entry.directory == target:
        return entry
    staging = staging_for(target)
    try:
        shutil.copytree(entry.directory, staging, dirs_exist_ok=True)
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    graphs = build.graphs(entry.directory.name)
    if graphs.is_dir() and graphs != build.graphs(key):
        shutil.rmtree(build.graphs(key), ignore_errors=True)
        shutil.copytree(graphs, build.graphs(key))
    published = EngineSet.read(target)
    published.artifacts(verify=True)
    return published


def _retire(ctx: BuildContext, entry: EngineSet) -> None:
    """Move a failing engine set out of engines/ (to candidates/<key>), so that the build's results, and a
    later `check`, are the engine sets that took its place."""
    build = ctx.build
    if entry.directory != build.engine(entry.key) or not entry.directory.is_dir():
        return
    retired = build.candidate(entry.key)
    shutil.rmtree(retired, ignore_errors=True)
    retired.parent.mkdir(parents=True, exist_ok=True)
    entry.directory.rename(retired)


def next_format(compare: dict[str, EngineSet], latency: dict[str, float]) -> str | None:
    """Of the passing formats a mix had to beat, the one a build takes instead: the fastest here when they
    were timed, else the nearest (fp16 before fp32)."""
    if not compare:
        return None
    timed = [p for p in compare if p in latency]
    return min(timed, key=latency.__getitem__) if timed else next(iter(compare))


def run_fallbacks(ctx: BuildContext, entries: list[EngineSet], report: Report, cached: dict, timings: dict) \
        -> tuple[list[EngineSet], list[Fallback], bool]:
    """The fallback for every engine set of a build with a reduced precision that fails its gate; returns
    the engine sets (a fixed one, or the next format that passes, in place of a failing one), the records
    for the report, and whether any engine set was replaced."""
    entries = list(entries)
    records = []
    replaced = False
    for entry in list(entries):
        precision = reduced_precision(entry.precision)
        if precision is None:
            continue
        check = report.engine(entry.key)
        hit = cached.get((entry.backend, entry.precision))
        if check is None or check.passed:
            if hit is not None:
                record = hit.record
                if check is not None and not _mix_kept(record, ctx.opts.int8_fallback):
                    # The build that found this list took the next format (a mix no faster than it, in mode
                    # on): so does this one, from the same timings, or a rebuild would decide otherwise.
                    compare = compare_engines(ctx, entry, entries, report)
                    record, took = _give_way(ctx, entries, entry, compare, record)
                    replaced = replaced or took
                records.append(record)
            continue
        if ctx.opts.int8_fallback == "off":
            ctx.say(f"[{entry.key}] fails its {precision} gate; --int8-fallback on would look for layers to keep "
                    "in fp32")
            continue
        if not fallback_applies(ctx, entry.precision):
            ctx.say(f"[{entry.key}] fails its int8 gate; no fallback from a bundle (its Q/DQ graph was calibrated "
                    "on the workstation): run the fallback there and bundle that build")
            continue
        t0 = time.perf_counter()
        compare = compare_engines(ctx, entry, entries, report)
        outcome = fallback_candidate(ctx, entry, check, compare=compare, hit=hit, applied=True)
        record = outcome.record
        if outcome.entry is not None and _mix_kept(record, ctx.opts.int8_fallback):
            entries[entries.index(entry)] = publish_as(ctx, outcome.entry, entry.key)
            replaced = True
        else:
            record, took = _give_way(ctx, entries, entry, compare, record)
            replaced = replaced or took
        records.append(record)
        timings[f"{entry.key} fallback"] = round(time.perf_counter() - t0, 2)
    return entries, records, replaced


def _mix_kept(record: Fallback, mode: str) -> bool:
    """Whether the build keeps the mix a fallback found: one that fixed the engine set, or any that passes
    when searching whatever the speed (`always`); else it gives way to the next format (`_give_way`)."""
    return record.verdict == "fixed" or (record.passed and mode == "always")


def _give_way(ctx: BuildContext, entries: list[EngineSet], entry: EngineSet, compare: dict[str, EngineSet],
              record: Fallback) -> tuple[Fallback, bool]:
    """`entry` replaced in `entries` by the next format that passes (`next_format`), when there is one: the
    record with the reason added, and whether it was replaced."""
    instead = next_format(compare, record.latency_ms)
    if instead is None:
        return record, False
    taken = compare[instead]
    why = f"; the build takes {taken.key}{ran_note(instead, compare)} instead, which passes every task"
    record = replace(record, message=record.message + why)
    ctx.say(f"[{entry.key}] {record.message}")
    i = entries.index(entry)
    _retire(ctx, entry)
    if any(e.key == taken.key for e in entries):
        del entries[i]
    else:
        entries[i] = publish_as(ctx, taken, taken.key)
    return record, True


def speed_notes(ctx: BuildContext, entries: list[EngineSet], report: Report, timings: dict) -> list[str]:
    """One line for each passing engine set slower here than another passing one of its backend."""
    notes = []
    for backend in dict.fromkeys(e.backend for e in entries):
        passing = {e.key: e for e in entries if e.backend == backend and report.engine(e.key)
                   and report.engine(e.key).passed}
        if len(passing) < 2:
            continue
        t0 = time.perf_counter()
        times = time_in_build(ctx, passing)
        timings[f"{backend} timing"] = round(time.perf_counter() - t0, 2)
        fastest = min(times, key=times.get)
        for key, ms in times.items():
            if key != fastest and ms > times[fastest]:
                notes.append(f"{key} is slower here than {fastest}, which also passes ({ms:.3g} ms vs "
                             f"{times[fastest]:.3g} ms at batch {ctx.opts.timing_batch})")
    for line in notes:
        ctx.say(f"[speed] {line}")
    return notes
