"""Accuracy-aware INT8: when an int8 engine fails a task's gate, keep the fewest layers in fp32 until
every task passes.

The search (`search_layers`) works on the int8 graph the engine was built from
(`calibration.sensitivity`: the Q/DQ ONNX for ONNX Runtime and TensorRT, the NNCF IR for OpenVINO),
putting layers back in float without recalibrating, so each try is cheap:

1. Rank every quantized compute layer by its local error: the relative error quantizing its own
   inputs adds to its output, all layers measured in one run on a few evaluation images.
2. Confirm with the gate: the top `SHORTLIST` layers are tried one at a time in float, each judged
   on the whole evaluation set by every task's checks, the failing task's own metric (mIoU drop,
   normals error...) among them; the layer that closes the most of the gap is kept, and the step
   repeats from there until every task passes. When no layer of the window helps, the next window
   down the ranking is tried. Every set tried is judged once (cached).
3. Prune: a kept layer whose removal still passes is dropped again.
4. The engine is rebuilt with those layers in fp32 (`prepare_graph(keep_fp32=names)`, which
   recalibrates: NNCF's ignored scope, or nodes the Q/DQ quantizer leaves alone) and checked like
   any engine. If it still fails, the search goes on from its graph (at most `ROUNDS` rebuilds).

Speed: the int8 engine, the 16-bit engine(s) of its backend and the result are timed here with their
own runners (`pipeline.speed`). In mode "on" the search stops, and says so, when int8 is no faster
than the 16-bit engine: layers in fp32 only make it slower. Mode "always" searches anyway (for a
device other than this machine, e.g. a TensorRT target); "off" builds int8 as calibrated.

The list is cached with the calibration (the build's calibration cache, keyed like a calibration:
graphs, calibration data, settings, plus the tolerances and evaluation data that decided it) and saved
as BUILD/fallback/<engine>.json, which `--keep-fp32 @FILE` reads back.
"""

from __future__ import annotations

import glob
import json
import math
import shutil
import time
from dataclasses import dataclass

from calibration.errors import CalibrationError
from engines.registry import BACKENDS, get_backend
from export.artifacts.engineset import EngineSet
from export.artifacts.files import write_json_atomic
from export.checking.accuracy import EngineChecker
from export.checking.results import (
    Check,
    EngineCheck,
    EngineInfo,
    Fallback,
    FallbackLayer,
    FallbackTask,
    Report,
)
from export.pipeline.check import tolerances_for
from export.pipeline.options import KEEP_FILE_FORMAT, precisions_used, role_precisions
from export.pipeline.speed import time_in_build
from export.pipeline.steps import publish, staging_for

SHORTLIST = 8  # layers tried one at a time per step, from the top of the ranking
MAX_LAYERS = 16  # most layers kept in fp32 before the search gives up
MAX_PROBES = 96  # most int8 graph variants judged per round
ROUNDS = 4  # rebuilds: the search goes on from a rebuilt engine's graph while it still fails
# After a layer that closed much of the gap, a next one that closes less than this share of what is left
# ends the round: the rebuilt engine (recalibrated without the first) is judged before adding more.
MIN_GAIN = 0.1
RANK_BATCHES = 2  # evaluation batches the local-error ranking runs on
SEARCH_VERSION = 1  # in the cache key: a changed search makes new lists
# The 16-bit precisions an int8 engine has to beat, where its backend builds them.
SIXTEEN_BIT = ("fp16", "bf16")
FALLBACK_FILE = "fallback.json"  # its name in a calibration cache entry
FALLBACK_SUFFIX = "+fallback"  # the name of the engine set a fallback builds: <backend>-int8+fallback


@dataclass
class CachedFallback:
    """A layer list from the calibration cache: {graph role: globs}, and the record of how it was found."""

    keep: dict[str, tuple[str, ...]]
    record: Fallback


# ----------------------------------------------------------------------------- judging


def _gap(check: Check) -> float:
    """How far a check is from passing, relative to its limit (0 when it passes)."""
    if not math.isfinite(check.value):
        return 1e6
    gap = check.value - check.limit if check.op == "<=" else check.limit - check.value
    return max(gap, 0.0) / max(abs(check.limit), 1e-3)


def shortfall(result: EngineCheck) -> float:
    """How far an engine is from passing every task's gate (0 when it passes)."""
    return sum(_gap(c) for task in result.tasks.values() for c in task.checks)


def _task_shortfall(result: EngineCheck) -> dict[str, float]:
    return {t: sum(_gap(c) for c in r.checks) for t, r in result.tasks.items()}


def failing_tasks(result: EngineCheck) -> list[FallbackTask]:
    """Each failing task's worst check (the metric drop when that fails)."""
    out = []
    for task, r in result.tasks.items():
        if r.failed:
            worst = max(r.failed, key=lambda c: (c.name.endswith("_drop"), _gap(c)))
            out.append(FallbackTask(task, worst.name, worst.limit, worst.op, worst.value))
        # a task that passes has nothing to report
    return out


def _value(result: EngineCheck, task: str, name: str) -> float | None:
    return next((c.value for c in result.tasks[task].checks if c.name == name), None)


# ----------------------------------------------------------------------------- the search


class _Probe:
    """The engine set as the search sees it: each int8 role's quantized graph with the chosen layers in
    float, the other roles' engines as built, chained as the set runs; judged on the evaluation set."""

    def __init__(self, ctx, entry: EngineSet, graphs: dict):
        self.ctx = ctx
        self.entry = entry
        self.graphs = graphs
        self.count = 0
        self._engines: dict = {}
        self._runners: dict = {}
        self._judged: dict[frozenset, EngineCheck] = {}
        self._tolerances = tolerances_for(entry, ctx.tolerances, ctx.info.interface.tasks)

    def close(self) -> None:
        for runner in self._engines.values():
            runner.deactivate()
        self._engines.clear()
        self._runners.clear()

    def _infer(self, role: str, floats: frozenset):
        if role not in self.graphs:
            if role not in self._engines:
                runner = get_backend(self.entry.backend).load(self.entry.directory / self.entry.files[role],
                                                              threads=self.ctx.opts.threads)
                self._engines[role] = runner.activate()
            return self._engines[role].infer
        key = (role, floats)
        if key not in self._runners:
            # At most two variants of a graph alive at once: the state kept so far and the one being tried.
            mine = [k for k in self._runners if k[0] == role]
            for old in mine[:-1]:
                del self._runners[old]
            self._runners[key] = self.graphs[role].runner(floats)
        return self._runners[key]

    def _inputs(self, role: str) -> list[str]:
        if role in self.graphs:
            return self.graphs[role].inputs
        self._infer(role, frozenset())
        return self._engines[role].input_names

    def infer(self, chosen: frozenset, feed) -> dict:
        floats = {role: frozenset(n for r, n in chosen if r == role) for role in self.entry.files}
        if "model" in self.entry.files:
            return self._infer("model", floats["model"])(feed)
        shared = self._infer("backbone", floats["backbone"])(feed)
        outputs = {}
        for role in self.entry.files:
            if role.startswith("head_"):
                outputs.update(self._infer(role, floats[role])({n: shared[n] for n in self._inputs(role)}))
        return outputs

    def judge(self, chosen) -> EngineCheck:
        key = frozenset(chosen)
        if key not in self._judged:
            interface = self.ctx.info.interface
            checker = EngineChecker(interface.channels, self.entry.precision, self._tolerances,
                                    postprocessed=interface.postprocessed)
            for batch in self.ctx.batches():
                checker.update(self.infer(key, {"image": batch.image}), batch)
            self._judged[key] = checker.finish(EngineInfo(self.entry.backend, self.entry.precision))
            self.count += 1
        return self._judged[key]

    def local_errors(self) -> dict[tuple[str, str], float]:
        feeds = [{"image": b.image} for b in self.ctx.batches()[:RANK_BATCHES]]
        errors = {}
        for role, graph in self.graphs.items():
            role_feeds = feeds
            if role.startswith("head_"):
                backbone = self._infer("backbone", frozenset())
                names = graph.inputs
                role_feeds = [{n: out[n] for n in names} for out in (backbone(f) for f in feeds)]
            errors.update({(role, name): e for name, e in graph.local_errors(role_feeds).items()})
        return errors


@dataclass
class SearchResult:
    chosen: list[tuple[str, str]]  # (graph role, node name), in the order they were kept
    layers: list[FallbackLayer]
    result: EngineCheck  # the judgement with `chosen` in float
    probes: int


def _layer(candidate: tuple[str, str], before: EngineCheck, after: EngineCheck, error: float) -> FallbackLayer:
    """What keeping `candidate` in float bought: the failing task it helped most, that task's worst check."""
    gaps_before, gaps_after = _task_shortfall(before), _task_shortfall(after)
    failing = [t for t, r in before.tasks.items() if r.failed] or list(before.tasks)
    task = max(failing, key=lambda t: gaps_before[t] - gaps_after[t])
    checks = before.tasks[task].failed or before.tasks[task].checks
    worst = max(checks, key=lambda c: (c.name.endswith("_drop"), _gap(c)))
    after_value = _value(after, task, worst.name)
    return FallbackLayer(candidate[1], candidate[0], task, worst.name, worst.value,
                         worst.value if after_value is None else after_value, error)


def search_layers(probe: _Probe, say, name: str) -> SearchResult:
    """Greedy search for the fewest layers in float that make every task pass (see the module docstring)."""
    base = probe.judge(())
    t0 = time.perf_counter()
    errors = probe.local_errors()
    ranking_s = time.perf_counter() - t0
    ranked = sorted(errors, key=lambda c: -(errors[c] if not math.isnan(errors[c]) else math.inf))
    if ranked:
        top = ", ".join(f"{n} ({errors[(r, n)]:.3g})" for r, n in ranked[:3])
        say(f"[{name}] ranked {len(ranked)} quantized layers by local error in {ranking_s:.1f} s; top: {top}")
    chosen: list[tuple[str, str]] = []
    layers: list[FallbackLayer] = []
    current, offset, big_step = base, 0, False
    while not current.passed and len(chosen) < MAX_LAYERS and probe.count < MAX_PROBES:
        window = [c for c in ranked if c not in chosen][offset:offset + SHORTLIST]
        window = window[:max(0, MAX_PROBES - probe.count)]
        if not window:
            break
        say(f"[{name}] trying {len(window)} layer(s) in fp32, one at a time"
            + (f" (ranks {offset + 1}-{offset + len(window)})" if offset else ""))
        tried = {c: probe.judge([*chosen, c]) for c in window}
        best = min(window, key=lambda c: shortfall(tried[c]))
        gain = shortfall(current) - shortfall(tried[best])
        if chosen and big_step and gain < MIN_GAIN * shortfall(current):
            say(f"[{name}] the next layer closes little of what is left; judging the rebuilt engine first")
            break
        if gain > 1e-9:
            big_step = big_step or gain >= MIN_GAIN * shortfall(current)
            layer = _layer(best, current, tried[best], errors[best])
            say(f"[{name}] keeping {best[1]} in fp32: {layer.task} {layer.check} {layer.before:.4g} -> {layer.after:.4g}")
            chosen.append(best)
            layers.append(layer)
            current, offset = tried[best], 0
        else:
            offset += SHORTLIST
    if current.passed and len(chosen) > 1:
        for candidate in list(reversed(chosen[:-1])):
            trial = [c for c in chosen if c != candidate]
            result = probe.judge(trial)
            if result.passed:
                say(f"[{name}] {candidate[1]} is not needed once the others are in fp32; dropped")
                chosen, current = trial, result
                layers = [layer for layer in layers if (layer.role, layer.node) != candidate]
    return SearchResult(chosen, layers, current, probe.count)


# ----------------------------------------------------------------------------- one engine set


def _quantized_graph(ctx, entry: EngineSet, role: str, name: str, keep: dict[str, list[str]]):
    """The int8 graph behind the engine of `role`, prepared again (a calibration-cache hit) to find it."""
    from calibration.sensitivity import open_quantized_graph
    from export.pipeline.build import keep_globs, prepare_role

    prepared = prepare_role(entry.backend, "int8", role, ctx.opts, ctx.info, ctx.export_dir, ctx.build,
                            ctx.calibration(), name, keep_globs(ctx.opts, role, keep))
    config = entry.artifacts(verify=False)[role].metadata.get("config")
    return open_quantized_graph(entry.backend, prepared.path, prepared.metadata, threads=ctx.opts.threads,
                                config=config)


def _int8_roles(entry: EngineSet) -> list[str]:
    return [r for r, p in role_precisions(entry.precision, entry.files).items() if p == "int8"]


def run_fallback(ctx, entry: EngineSet, failed: EngineCheck, *, compare: dict[str, EngineSet],
                 start_keep: dict[str, tuple[str, ...]] | None = None) \
        -> tuple[EngineSet | None, EngineCheck | None, Fallback]:
    """Search and rebuild until every task passes (see the module docstring).

    `compare` holds the engine sets int8 has to beat ({label: set}, the 16-bit ones). Returns the engine
    set with layers in fp32, built as candidates/<key>+fallback, and its check (both None when none was
    built), and the record.
    """
    say, mode = ctx.say, ctx.opts.int8_fallback
    key = entry.key
    name = f"{key}{FALLBACK_SUFFIX}"
    started = time.perf_counter()
    tasks = failing_tasks(failed)
    say(f"[{key}] fails its int8 gate ({'; '.join(t.describe() for t in tasks)}): looking for the layers "
        "responsible")
    latency: dict[str, float] = {}
    if compare:
        latency.update(time_in_build(ctx, {"int8": entry, **compare}))
        fastest = min(compare, key=latency.get)
        say(f"[{key}] int8 runs {latency['int8']:.3g} ms here, {fastest} {latency[fastest]:.3g} ms "
            f"(batch {ctx.opts.timing_batch})")
        if mode == "on" and latency["int8"] >= latency[fastest]:
            message = (f"int8 ({latency['int8']:.3g} ms) is no faster than {fastest} ({latency[fastest]:.3g} ms) "
                       f"here, so layers in fp32 cannot pay off: build --precision {fastest}, or search anyway with "
                       "--int8-fallback always")
            say(f"[{key}] {message}")
            return None, None, Fallback(key, "stopped", message, tuple(tasks), (), latency,
                                        seconds=round(time.perf_counter() - started, 2))
    # Per graph role, --keep-fp32 globs: a node name escaped so that it matches only itself.
    keep = {role: list((start_keep or {}).get(role, ())) for role in _int8_roles(entry)}
    layers: list[FallbackLayer] = []
    probes, current, current_check, verdict, faster = 0, entry, failed, "failed", None
    target = ctx.build.candidate(name)
    for _ in range(ROUNDS):
        graph_name = key if current is entry else name
        try:
            graphs = {role: _quantized_graph(ctx, current, role, graph_name, keep) for role in keep}
            probe = _Probe(ctx, current, graphs)
            try:
                found = search_layers(probe, say, key)
            finally:
                probe.close()
        except CalibrationError as err:
            # The search is a help, not a step the build needs: its failure leaves int8 as it was.
            message = f"the layer search could not run ({err}); the int8 engine stays as calibrated"
            say(f"[{key}] {message}")
            return None, None, Fallback(key, "failed", message, tuple(tasks), tuple(layers), latency, probes,
                                        round(time.perf_counter() - started, 2))
        probes += found.probes
        if not found.chosen:
            say(f"[{key}] no layer in fp32 brings the failing tasks closer to passing")
            break
        for role, node in found.chosen:
            keep[role].append(glob.escape(node))
        layers += found.layers
        count = sum(len(v) for v in keep.values())
        say(f"[{key}] rebuilding int8 with {count} layer(s) in fp32")
        current = ctx.engine(entry.backend, entry.precision, name=name, target=target, extra_keep=keep)
        current_check = ctx.check([current]).report.engines[0]
        if compare:
            # Timed together, so the three numbers compare (the first int8 is still where it was built).
            times = time_in_build(ctx, {"int8": entry, "int8+fallback": current, **compare})
            latency.update(times)
            fastest = min(compare, key=times.get)
            faster = times["int8+fallback"] < times[fastest]
        if current_check.passed:
            verdict = "fixed" if faster is not False else "not faster"
            break
        if mode == "on" and faster is False:
            verdict = "stopped"
            break
    after = {t.task: _value(current_check, t.task, t.check) for t in tasks} if current is not entry else {}
    tasks = [FallbackTask(t.task, t.check, t.limit, t.op, t.before, after.get(t.task)) for t in tasks]
    kept = sum(len(v) for v in keep.values())
    message = _message(verdict, kept, latency, compare)
    say(f"[{key}] {message}")
    record = Fallback(key, verdict, message, tuple(tasks), tuple(layers), latency, probes,
                      round(time.perf_counter() - started, 2))
    if current is not entry and verdict in ("fixed", "not faster"):
        record = _save(ctx, entry, keep, record)
    if current is entry:
        return None, None, record
    return current, current_check, record


def _message(verdict: str, kept: int, latency: dict[str, float], compare: dict) -> str:
    layers = f"{kept} layer{'s' if kept != 1 else ''} in fp32"
    speed = ""
    if "int8+fallback" in latency:
        fastest = min(compare, key=latency.get)
        speed = (f"; {latency['int8+fallback']:.3g} ms vs int8 {latency.get('int8', math.nan):.3g} ms and "
                 f"{fastest} {latency[fastest]:.3g} ms")
    if verdict == "fixed":
        return f"every task passes with {layers}{speed}"
    if verdict == "not faster":
        fastest = min(compare, key=latency.get)
        return f"every task passes with {layers}, but it is no faster than {fastest} here{speed}: prefer {fastest}"
    if verdict == "stopped":
        return f"still failing with {layers} and no faster than the 16-bit engine{speed}: stopped; prefer 16-bit"
    return f"could not make every task pass ({layers} tried){speed}; the int8 engine stays as calibrated"


# ----------------------------------------------------------------------------- the list, cached and saved


def _cache_key(ctx, backend: str, precision: str) -> str:
    from calibration.cache import cache_key
    from engines.files import sha256_file

    graphs = {role: sha256_file(ctx.export_dir / f) for role, f in ctx.info.graph_files.items()}
    opts = ctx.opts
    settings = {"kind": "int8-fallback", "search": SEARCH_VERSION, "backend": backend, "precision": precision,
                "calib_method": opts.calib_method, "keep_fp32": list(opts.keep_fp32),
                "keep_fp32_roles": {r: list(g) for r, g in opts.keep_fp32_roles.items()},
                "tolerances": ctx.tolerances.overrides, "eval_data": opts.eval_data, "eval_samples": opts.eval_samples,
                "max_batch": opts.max_batch}
    return cache_key(json.dumps(graphs, sort_keys=True).encode(), ctx.calibration().fingerprint(), settings)


def _save(ctx, entry: EngineSet, keep: dict[str, list[str]], record: Fallback) -> Fallback:
    """Write BUILD/fallback/<engine>.json and store the same bytes in the calibration cache."""
    from calibration.cache import CalibrationCache

    path = ctx.build.fallback_file(entry.key)
    record = Fallback(**{**record.__dict__, "file": str(path)})
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


def fallback_applies(ctx, precision: str) -> bool:
    return "int8" in precisions_used(precision) and ctx.opts.int8_fallback != "off" and ctx.bundle_graphs is None


def cached_fallbacks(ctx, pairs) -> dict[tuple[str, str], CachedFallback]:
    """The cached layer lists of this build's int8 engine sets, by (backend, precision)."""
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
        ctx.say(f"[{backend}-{precision}] the int8 fallback of an earlier build applies: {count} layer(s) in fp32 "
                f"({path})")
        found[(backend, precision)] = CachedFallback(keep, Fallback(**{**record.__dict__, "cached": True,
                                                                          "file": str(path)}))
    return found


# ----------------------------------------------------------------------------- in a build


def sixteen_bit_engines(ctx, backend: str, entries: list[EngineSet], report: Report) -> dict[str, EngineSet]:
    """The 16-bit engine sets of `backend` an int8 one is compared with: the build's own, else built as
    candidates/<backend>-<precision> (not part of the build's results); only those that pass every gate,
    since a faster 16-bit engine that fails is no reason to give up on int8."""
    out = {}
    for precision in SIXTEEN_BIT:
        if precision not in BACKENDS[backend].precisions:
            continue
        own = next((e for e in entries if e.backend == backend and e.precision == precision), None)
        key = f"{backend}-{precision}"
        engine = own or ctx.engine(backend, precision, name=key, target=ctx.build.candidate(key))
        check = report.engine(key) if own is not None else None
        if check is None:
            check = ctx.check([engine]).report.engines[0]
        if check.passed:
            out[precision] = engine
        else:
            ctx.say(f"[{key}] fails its gate too, so int8 is not measured against it")
    return out


def publish_as(ctx, entry: EngineSet, key: str) -> EngineSet:
    """Copy a candidate engine set (and its prepared graphs, which bundles take) to engines/<key>."""
    build = ctx.build
    target = build.engine(key)
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


def run_fallbacks(ctx, entries: list[EngineSet], report: Report, cached: dict, timings: dict) \
        -> tuple[list[EngineSet], list]:
    """The fallback for every int8 engine set of a build that fails its gate; returns the engine sets
    (a fixed one in place of the failing one) and the fallback records for the report."""
    entries = list(entries)
    records = []
    for i, entry in enumerate(entries):
        if "int8" not in precisions_used(entry.precision):
            continue
        check = report.engine(entry.key)
        hit = cached.get((entry.backend, entry.precision))
        if check is None or check.passed:
            if hit is not None:
                records.append(hit.record)
            continue
        if ctx.opts.int8_fallback == "off":
            ctx.say(f"[{entry.key}] fails its int8 gate; --int8-fallback on would look for layers to keep in fp32")
            continue
        if ctx.bundle_graphs is not None:
            ctx.say(f"[{entry.key}] fails its int8 gate; no fallback from a bundle (its Q/DQ graph was calibrated "
                    "on the workstation): run the fallback there and bundle that build")
            continue
        t0 = time.perf_counter()
        compare = sixteen_bit_engines(ctx, entry.backend, entries, report)
        fixed, _, record = run_fallback(ctx, entry, check, compare=compare, start_keep=hit.keep if hit else None)
        if fixed is not None and record.passed:
            entries[i] = publish_as(ctx, fixed, entry.key)
        records.append(record)
        timings[f"{entry.key} fallback"] = round(time.perf_counter() - t0, 2)
    return entries, records


def speed_notes(ctx, entries: list[EngineSet], report: Report, timings: dict) -> list[str]:
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
