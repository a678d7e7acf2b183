"""What a build tried between 16-bit and fp32, read from its report.json: per backend, the pure 16-bit
engine, 16-bit with the layers its fallback kept in fp32, and fp32, each with its error and time.

Two records hold these (`export.checking.results`):

- `report.auto` (`--precision auto`): every candidate (`fp32`, `fp16`, `bf16`, `int8`, and
  `<precision>+fallback` for one that failed a gate), each with its whole check and the latency the
  build timed them at, side by side;
- `report.fallbacks` (any build whose reduced-precision engine failed a gate): one `Fallback` per
  engine set, with the failing tasks' check before (the pure engine) and after (with layers in fp32),
  and `latency_ms` keyed by what was timed together: the precision itself (`fp16`), the mix
  (`fp16+fallback`) and the formats the mix had to beat (`fp32`, which pass every gate).

The rows are built from whatever the report contains, so a backend, a precision or a form the build
adds shows up without a change here. `judge_search` gives the bench page's verdict on the
mixed-precision search: the build passes, and keeps the fastest candidate that meets the tolerances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from export.checking.results import EngineCheck, Fallback, Report

MIX = "+fallback"  # how a build names 16-bit or int8 with layers in fp32: `<precision>+fallback`
SIXTEEN_BIT = ("fp16", "bf16")
# The forms in the order the page lists them, and what each is called there.
FORMS = {"16-bit": "pure 16-bit", "16-bit+fp32": "16-bit with fp32 layers", "fp32": "fp32", "int8": "int8",
         "int8+fp32": "int8 with fp32 layers"}
NOISE = 1.05  # two timings of one engine differ by up to this on a shared machine: "never slower than fp32"
TIGHT_FRACTION = 1 / 3  # the tight tolerance file: this share of what the pure 16-bit engine measured
ANGLE_LIMIT = "max_angle_deg"  # the tolerance on the normals' angle, which `angle_deg` is judged by


def form_of(name: str) -> str:
    """The form of a candidate name: 'bf16' -> '16-bit', 'fp16+fallback' -> '16-bit+fp32', 'fp32' -> 'fp32'."""
    base, mixed = name.removesuffix(MIX), name.endswith(MIX)
    kind = "16-bit" if base in SIXTEEN_BIT else base
    return f"{kind}+fp32" if mixed else kind


@dataclass
class Rung:
    """One candidate of one backend: its error and time, and whether it met the build's tolerances."""

    backend: str
    name: str  # "fp16", "fp16+fallback", "fp32"...
    passed: bool | None  # None: not known from the report
    latency_ms: float | None  # as the build timed it (candidates of a backend are timed together)
    errors: dict[str, float] = field(default_factory=dict)  # "task check" -> value (the gates that decided)
    drops: dict[str, float] = field(default_factory=dict)  # task -> primary-metric drop, where measured
    ran: str = ""  # the precision that executed
    chosen: bool = False  # the engine the build kept
    failed: str = ""  # the checks it fails, for people

    @property
    def form(self) -> str:
        return form_of(self.name)

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.name}"


def _check_errors(check: EngineCheck, wanted: Sequence[tuple[str, str]] | None = None) -> dict[str, float]:
    """'task check' -> value for the checks `wanted` ((task, check) pairs), or every failed one."""
    out = {}
    for task, result in check.tasks.items():
        for c in result.checks:
            if (wanted is None and not c.passed) or (wanted is not None and (task, c.name) in wanted):
                out[f"{task} {c.name}"] = c.value
    return out


def _drops(check: EngineCheck) -> dict[str, float]:
    return {task: r.metrics.drop for task, r in check.tasks.items() if r.metrics is not None}


def _rung_from_check(backend: str, name: str, check: EngineCheck, latency_ms: float | None,
                     wanted: Sequence[tuple[str, str]] | None = None, chosen: bool = False) -> Rung:
    return Rung(backend, name, check.passed, latency_ms, _check_errors(check, wanted), _drops(check),
                check.engine.precision_executed, chosen,
                "; ".join(f"{t} {c.describe()}" for t, r in check.tasks.items() for c in r.failed))


def auto_rungs(report: Report) -> list[Rung]:
    """Every candidate `--precision auto` compared, with its whole check (nothing when it did not run)."""
    if report.auto is None:
        return []
    return [_rung_from_check(c.backend, c.name, c.check, c.latency_ms, chosen=c.chosen) for c in report.auto.candidates]


def _other_check(key: str, reports: Sequence[Report]) -> EngineCheck | None:
    """The check of engine set `key` in the first report that has it (a report's engines, or auto's candidates:
    the same evaluation data measures the same error whatever tolerances judged it)."""
    backend, _, name = key.partition("-")
    for report in reports:
        engine = report.engine(key)
        if engine is not None:
            return engine
        if report.auto is not None:
            found = next((c.check for c in report.auto.candidates if c.backend == backend and c.name == name), None)
            if found is not None:
                return found
    return None


def _pure_check(key: str, reports: Sequence[Report]) -> EngineCheck | None:
    """The check of engine set `key` as built, with no layer in fp32: auto's candidate of that name, or a
    report's engine that no passing fallback replaced."""
    backend, _, name = key.partition("-")
    for report in reports:
        if report.auto is not None:
            found = next((c.check for c in report.auto.candidates if c.backend == backend and c.name == name), None)
            if found is not None:
                return found
        record = next((f for f in report.fallbacks if f.engine == key), None)
        engine = report.engine(key)
        if engine is not None and not (record is not None and record.passed):
            return engine
    return None


def fallback_rungs(report: Report, fallback: Fallback, elsewhere: Sequence[Report] = ()) -> list[Rung]:
    """The candidates one fallback record names: the pure engine, the mix, and the formats timed with them.

    Errors are the failing tasks' checks: before (pure) and after (the mix) from the record; for the other
    formats, the same checks from the engine's own check in `report` or, failing that, in `elsewhere`."""
    backend, _, precision = fallback.engine.partition("-")
    wanted = [(t.task, t.check) for t in fallback.tasks]
    kept = {e.key for e in report.engines}
    mix = f"{precision}{MIX}"
    names = list(dict.fromkeys([precision, *([mix] if fallback.passed else []), *fallback.latency_ms]))
    rungs = []
    for name in names:
        latency = fallback.latency_ms.get(name)
        if name == precision:
            pure = _pure_check(fallback.engine, [report, *elsewhere])
            rung = Rung(backend, name, False, latency, {f"{t.task} {t.check}": t.before for t in fallback.tasks},
                        _drops(pure) if pure is not None else {}, pure.engine.precision_executed if pure is not None else "",
                        chosen=fallback.engine in kept and not fallback.passed,
                        failed="; ".join(f"{t.task} {t.check} {t.before:.4g} (limit {t.op} {t.limit:.4g})"
                                         for t in fallback.tasks))
        elif name == mix:
            chosen = fallback.engine in kept and fallback.passed
            published = report.engine(fallback.engine) if chosen else None
            if published is not None:  # the mix took the engine set's place: its whole check is the report's
                rung = _rung_from_check(backend, name, published, latency, wanted, chosen=True)
            else:
                rung = Rung(backend, name, fallback.passed, latency,
                            {f"{t.task} {t.check}": t.after for t in fallback.tasks if t.after is not None},
                            failed="" if fallback.passed else fallback.message)
        else:
            key = f"{backend}-{name}"
            check = _other_check(key, [report, *elsewhere])
            # A format a mix had to beat was timed only because it passes every gate (pipeline.fallback).
            rung = _rung_from_check(backend, name, check, latency, wanted, chosen=key in kept) if check is not None \
                else Rung(backend, name, True, latency, chosen=key in kept)
        rungs.append(rung)
    return rungs


def build_rungs(report: Report, elsewhere: Sequence[Report] = (), forms: Sequence[str] | None = None) -> list[Rung]:
    """The rungs of a build: auto's candidates when it ran, else each fallback's, else its engines as built;
    only `forms` (keys of FORMS) when given, 16-bit first, then mixes, fp32, int8."""
    rungs = auto_rungs(report)
    if not rungs:
        searched = set()
        for fallback in report.fallbacks:
            rungs += fallback_rungs(report, fallback, elsewhere)
            searched.add(fallback.engine.partition("-")[0])
        for engine in report.engines:
            if engine.engine.backend not in searched:
                rungs.append(_rung_from_check(engine.engine.backend, engine.engine.precision, engine, None, chosen=True))
    order = list(FORMS)
    rungs = [r for r in rungs if forms is None or r.form in forms]
    unique = {(r.backend, r.name): r for r in rungs}  # a report names a format once per backend
    return sorted(unique.values(), key=lambda r: (r.backend, order.index(r.form) if r.form in order else len(order),
                                                  r.name))


# ----------------------------------------------------------------------------- the tight tolerance file


def pure_angles(backend: str, precision: str, reports: Sequence[Report]) -> dict[str, float]:
    """{task: angle_deg} of the pure `backend-precision` engine (no layer in fp32), from the first report
    that measured it: auto's candidate, a fallback's 'before', or the engine itself when no fallback
    replaced it."""
    key = f"{backend}-{precision}"
    for report in reports:
        if report.auto is not None:
            check = next((c.check for c in report.auto.candidates if c.backend == backend and c.name == precision),
                         None)
            if check is not None:
                return {t: r.angle_deg for t, r in check.tasks.items() if r.angle_deg is not None}
        record = next((f for f in report.fallbacks if f.engine == key), None)
        engine = report.engine(key)
        if record is not None:
            before = {t.task: t.before for t in record.tasks if t.check == "angle_deg"}
            if engine is not None and not record.passed:  # still the pure engine: every task's angle is there
                before = {**{t: r.angle_deg for t, r in engine.tasks.items() if r.angle_deg is not None}, **before}
            if before:
                return before
        elif engine is not None:
            return {t: r.angle_deg for t, r in engine.tasks.items() if r.angle_deg is not None}
    return {}


def tight_tolerances(angles: Mapping[str, float], fraction: float = TIGHT_FRACTION) -> dict:
    """The tolerance file (export.checking.tolerances' format) whose fp16 and bf16 normals limit is `fraction`
    of the angle the pure 16-bit engine measured."""
    limits = {task: {ANGLE_LIMIT: angle * fraction} for task, angle in angles.items()}
    return {precision: {t: dict(v) for t, v in limits.items()} for precision in SIXTEEN_BIT}


# ----------------------------------------------------------------------------- the verdict


@dataclass
class SearchVerdict:
    rungs: list[Rung]
    chosen: Rung | None
    measured: str
    verdict: str


def judge_search(report: Report | None, failure: str = "", times_ms: Mapping[str, float] | None = None,
                 elsewhere: Sequence[Report] = (), noise: float = NOISE) -> SearchVerdict:
    """Did the build with the tight tolerance file pass, trying pure 16-bit, 16-bit with fp32 layers and fp32,
    and keep the fastest that passes (never slower than fp32 by more than `noise`)?

    `times_ms` ({rung key: ms}, timed in turn by the bench) replaces the build's own timings where given.
    A build that failed, or a report without the search's records, is a MISS that says why."""
    if report is None:
        return SearchVerdict([], None, "n/a", f"MISS: {failure or 'the build wrote no report'}")
    searched = [f for f in report.fallbacks if f.engine.partition("-")[2] in SIXTEEN_BIT]
    rungs = [r for f in searched for r in fallback_rungs(report, f, elsewhere)]
    chosen = next((r for r in rungs if r.chosen), None)
    if failure:
        return SearchVerdict(rungs, chosen, "n/a", f"MISS: {failure}")
    if not report.passed:
        fails = "; ".join(f"{e.key}: {t} {c.describe()}" for e in report.engines for t, r in e.tasks.items()
                          for c in r.failed)
        return SearchVerdict(rungs, chosen, "n/a", f"MISS: the build fails its gate ({fails})")
    if not searched:
        return SearchVerdict(rungs, chosen, "n/a", "MISS: the build ran no 16-bit search (report.json has no "
                             "fallback record for an fp16 or bf16 engine set)")
    if chosen is None:
        return SearchVerdict(rungs, None, "n/a", "MISS: none of the candidates the search records is the engine the "
                             "build kept")
    # The verdict compares the engines that pass (and the kept one), all timed by the bench or all by the build.
    passing = [r for r in rungs if r.passed]
    compared = list({r.key: r for r in [*passing, chosen]}.values())
    source = times_ms if times_ms and all(r.key in times_ms for r in compared) else {r.key: r.latency_ms for r in rungs}
    times = {r.key: source.get(r.key) for r in compared}
    untimed = [key for key, ms in times.items() if ms is None]
    if untimed:
        return SearchVerdict(rungs, chosen, "n/a", f"MISS: no time for {', '.join(untimed)}")
    if not passing:
        return SearchVerdict(rungs, chosen, "n/a", "MISS: no candidate meets the tolerances")
    fastest = min(passing, key=lambda r: times[r.key])
    ratio = times[chosen.key] / times[fastest.key]
    fp32 = next((r for r in passing if r.form == "fp32" and r.backend == chosen.backend), None)
    vs_fp32 = times[chosen.key] / times[fp32.key] if fp32 is not None else None
    measured = f"{chosen.key}: {ratio:.2f}x the fastest passing ({fastest.key})" + \
        ("" if vs_fp32 is None else f", {vs_fp32:.2f}x fp32")
    if not chosen.passed:
        return SearchVerdict(rungs, chosen, measured, f"MISS: the kept engine ({chosen.key}) fails the tolerances")
    if ratio > noise or (vs_fp32 is not None and vs_fp32 > noise):
        return SearchVerdict(rungs, chosen, measured, f"MISS: {fastest.key} passes and is faster")
    return SearchVerdict(rungs, chosen, measured, "PASS")
