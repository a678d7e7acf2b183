"""Which layers to keep in fp32 so that every task passes: the search, apart from how a try is built and
judged (`pipeline.probes`) and from the build around it (`pipeline.fallback`).

A *layer* is any hashable name (the harness uses (graph role, node name)); a *judge* says of a set of
layers kept in fp32 whether every task passes and how far it is from passing (`Verdict.shortfall`, 0 when
it passes), and may rank the layers by the error each adds, measured in one pass. Two strategies:

- ranked (`ranked_search`), when the ranking is informative: the top `shortlist` layers are tried one at
  a time, up to the first that makes every task pass; the one that closes most of the gap is kept, and
  the step repeats from there until every task passes. A layer helps only when it closes at least
  1/m of what is left, m being the layers this round of the search may still keep: the ranking puts
  the layers that add most error first, so if the best of a window closes less, m layers like it
  would not pass in this round, and keeping it would only spend the budget (seen on a 448 model's fp16 graph: a round kept 6 layers
  for 0.2% of the gap, in 96 judged sets). A window in which no layer helps moves on down the ranking;
  `idle_windows` such windows in a row end the search. After a layer that closed much of the gap, a
  next one that closes less than `min_gain` of what is left ends the search (the harness rebuilds and
  judges the real engine before adding more). Kept layers that are not needed once the others are in
  fp32 are pruned. A round that keeps no layer at all goes on by bisection (below), within what is left
  of its budget: its first set, every candidate in fp32, says whether any set of them can pass (on a
  448 model's fp16 graph, none could: the rest of the error was in the operations that stay 16-bit).
- bisection (`bisect_search`), when there is no ranking or it does not tell layers apart: first every
  candidate in fp32 — if even that fails, layers in fp32 cannot help, and the search says so — then the
  set is shrunk by halves (delta debugging) to a set from which no single layer can be dropped.

Both stop at the budget (`Limits.max_probes` sets judged, `Limits.max_layers` layers kept). Every set is
judged once. Whether a passing mix is worth having is a question of speed, answered by `cannot_pay_off`.

No I/O and no engines here: the search is unit-tested with a scripted judge.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Layer = Hashable
Say = Callable[[str], None]

# A ranking tells layers apart when its largest error is this many times its median: fp16's rounding adds
# about the same relative error at every layer, and a flat ranking is no better than graph order.
INFORMATIVE_RATIO = 4.0


@dataclass(frozen=True)
class Verdict:
    """A set of layers in fp32, judged: `shortfall` is how far it is from passing every task's gate
    (0 when it passes); `detail` is the harness's own judgement (per task), passed through untouched."""

    passed: bool
    shortfall: float
    detail: Any = None


class Judge(Protocol):
    def judge(self, keep: frozenset) -> Verdict:
        """Every task's gate on the evaluation set, with the layers of `keep` in fp32."""

    def ranking(self) -> Mapping[Layer, float] | None:
        """The error each candidate layer adds, measured in one pass; None when the backend has no such probe."""


class Unjudgeable(Exception):
    """A judge's word that a set of layers cannot be tried (e.g. a graph with every layer in fp32 is refused
    as not converted); the search counts it as failing, and bisection does without its first check."""


@dataclass(frozen=True)
class Limits:
    shortlist: int = 8  # layers tried one at a time per step, from the top of the ranking
    max_layers: int = 16  # most layers kept in fp32 before the search gives up
    max_probes: int = 96  # most sets judged
    min_gain: float = 0.1  # see the module docstring
    idle_windows: int = 2  # windows in a row without a layer that helps end a ranked search


@dataclass(frozen=True)
class Step:
    """A layer the search kept, with the judgements without it and with it."""

    layer: Layer
    before: Verdict
    after: Verdict
    error: float = math.nan  # its error in the ranking (NaN without one)


# Why a search stopped.
STOPS = {
    "passed": "every task passes",
    "no gain": "none of the top-ranked layers tried in fp32 brings the failing tasks closer to passing",
    "too little": "none of the top-ranked layers tried in fp32 closes enough of the gap to pass within the layers "
                  "a round keeps",
    "small gain": "the next layer closes little of what is left",
    "budget": "the search's budget is spent",
    "cannot help": "even every candidate layer in fp32 does not make every task pass",
    "no candidates": "there is no layer to keep in fp32",
}


@dataclass
class SearchResult:
    strategy: str  # "ranked" or "bisection"
    chosen: list[Layer]  # in the order they were kept
    steps: list[Step]
    verdict: Verdict  # with `chosen` in fp32
    probes: int  # sets judged
    stop: str  # a key of STOPS
    ranking: dict[Layer, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict.passed


UNJUDGEABLE = Verdict(False, math.inf, None)


class _Memo:
    """The judge, each set judged once and counted."""

    def __init__(self, judge: Judge):
        self.judge_ = judge
        self.judged: dict[frozenset, Verdict] = {}

    @property
    def count(self) -> int:
        return len(self.judged)

    def __call__(self, keep: Iterable[Layer]) -> Verdict:
        key = frozenset(keep)
        if key not in self.judged:
            try:
                self.judged[key] = self.judge_.judge(key)
            except Unjudgeable:
                self.judged[key] = UNJUDGEABLE
        return self.judged[key]


def is_informative(errors: Mapping[Layer, float] | None) -> bool:
    """Whether a ranking tells layers apart (see INFORMATIVE_RATIO); an infinite or NaN error (a layer that
    overflows) always stands out."""
    if not errors:
        return False
    values = list(errors.values())
    if any(not math.isfinite(v) for v in values):
        return True
    median = statistics.median(values)
    return max(values) > INFORMATIVE_RATIO * median if median > 0 else max(values) > 0


def rank_order(errors: Mapping[Layer, float]) -> list[Layer]:
    """Largest error first; NaN (a layer whose error could not be measured) first of all."""
    return sorted(errors, key=lambda c: -(errors[c] if not math.isnan(errors[c]) else math.inf))


def search(judge: Judge, candidates: Sequence[Layer], limits: Limits = Limits(), say: Say = lambda _: None,
           *, errors: Mapping[Layer, float] | None = None) -> SearchResult:
    """The fewest layers of `candidates` in fp32 that make every task pass: ranked when the judge's ranking
    (or `errors`, measured already) is informative, else by bisection."""
    if errors is None:
        errors = judge.ranking()
    if errors is not None:
        wanted = set(candidates)
        errors = {c: e for c, e in errors.items() if c in wanted}
    if is_informative(errors):
        probe = _Memo(judge)
        ranked = ranked_search(judge, errors, limits, say, memo=probe)
        if ranked.chosen or ranked.stop not in ("too little", "no gain"):
            return ranked
        # No single layer near the top of the ranking closes enough: the error is spread thinly. Every
        # candidate in fp32 at once says whether any set can pass at all (one judged set); bisection then
        # finds one within what is left of the budget.
        say("no top-ranked layer closes enough of the gap alone; trying every candidate layer in fp32")
        return bisect_search(judge, candidates, limits, say, errors=errors, memo=probe)
    if errors:
        say(f"the ranking of {len(errors)} layers does not tell them apart; bisecting instead")
    return bisect_search(judge, candidates, limits, say, errors=errors or {})


def ranked_search(judge: Judge, errors: Mapping[Layer, float], limits: Limits = Limits(),
                  say: Say = lambda _: None, *, memo: _Memo | None = None) -> SearchResult:
    """Greedy search down the ranking (see the module docstring)."""
    probe = memo or _Memo(judge)
    ranked = rank_order(errors)
    current = probe(())
    chosen: list[Layer] = []
    steps: list[Step] = []
    offset, big_step, stop, idle, some_gain = 0, False, "passed", 0, False
    while not current.passed:
        if len(chosen) >= limits.max_layers or probe.count >= limits.max_probes:
            stop = "budget"
            break
        window = [c for c in ranked if c not in chosen][offset:offset + limits.shortlist]
        window = window[:max(0, limits.max_probes - probe.count)]
        if not window:
            stop = "too little" if some_gain else "no gain"
            break
        say(f"trying {len(window)} layer(s) in fp32, one at a time"
            + (f" (ranks {offset + 1}-{offset + len(window)})" if offset else "") + ", until one passes")
        tried = {}
        for layer in window:
            tried[layer] = probe([*chosen, layer])
            if tried[layer].passed:  # none closes more of the gap: judging the rest of the window would be waste
                break
        best = min(tried, key=lambda c: (not tried[c].passed, tried[c].shortfall))
        gain = current.shortfall - tried[best].shortfall
        if chosen and big_step and gain < limits.min_gain * current.shortfall:
            say("the next layer closes little of what is left; judging the rebuilt engine first")
            stop = "small gain"
            break
        # At least 1/m of what is left, with m layers still to keep (module docstring).
        if tried[best].passed or (gain > 1e-9 and gain * (limits.max_layers - len(chosen)) >= current.shortfall):
            big_step = big_step or gain >= limits.min_gain * current.shortfall
            steps.append(Step(best, current, tried[best], errors[best]))
            chosen.append(best)
            current, offset, idle, some_gain = tried[best], 0, 0, False
        else:
            some_gain = some_gain or gain > 1e-9
            offset, idle = offset + limits.shortlist, idle + 1
            if idle >= limits.idle_windows:
                stop = "too little" if some_gain else "no gain"
                break
    if current.passed and len(chosen) > 1:
        chosen, current, steps = _prune(probe, chosen, current, steps, say)
    return SearchResult("ranked", chosen, steps, current, probe.count, "passed" if current.passed else stop,
                        dict(errors))


def _prune(probe: _Memo, chosen: list[Layer], current: Verdict, steps: list[Step], say: Say):
    """Drop every kept layer (the last kept excepted) that the others make unnecessary."""
    for candidate in list(reversed(chosen[:-1])):
        trial = [c for c in chosen if c != candidate]
        result = probe(trial)
        if result.passed:
            say(f"{_name(candidate)} is not needed once the others are in fp32; dropped")
            chosen, current = trial, result
            steps = [s for s in steps if s.layer != candidate]
    return chosen, current, steps


def bisect_search(judge: Judge, candidates: Sequence[Layer], limits: Limits = Limits(),
                  say: Say = lambda _: None, *, errors: Mapping[Layer, float] | None = None,
                  memo: _Memo | None = None) -> SearchResult:
    """Delta debugging over `candidates` (see the module docstring): a passing set from which no single
    layer can be dropped, or, when the budget runs out first, the smallest passing set found."""
    probe = memo or _Memo(judge)
    errors = dict(errors or {})
    base = probe(())
    if base.passed:
        return SearchResult("bisection", [], [], base, probe.count, "passed", errors)
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        return SearchResult("bisection", [], [], base, probe.count, "no candidates", errors)
    every = probe(candidates)
    if every is UNJUDGEABLE:
        say(f"all {len(candidates)} candidate layers in fp32 cannot be tried at once; narrowing them down by halves")
    elif not every.passed:
        say(f"even all {len(candidates)} candidate layers in fp32 fail a task's gate ({_past(every)}, against "
            f"{_past(base)} with none): layers in fp32 cannot help")
        return SearchResult("bisection", [], [], base, probe.count, "cannot help", errors)
    else:
        say(f"all {len(candidates)} candidate layers in fp32 pass; narrowing them down by halves")
    current, verdict, parts = candidates, every, 2
    while len(current) >= 2:
        chunks = _split(current, parts)
        # Each chunk alone, then (with more than two chunks) everything but one chunk: ddmin's two moves.
        tries = [(chunk, 2) for chunk in chunks]
        if len(chunks) > 2:
            tries += [([x for x in current if x not in chunk], max(parts - 1, 2)) for chunk in chunks]
        moved = False
        for trial, next_parts in tries:
            if probe.count >= limits.max_probes and frozenset(trial) not in probe.judged:
                break
            result = probe(trial)
            if result.passed:
                current, verdict, parts, moved = trial, result, next_parts, True
                break
        if probe.count >= limits.max_probes and not moved:
            say(f"the budget of {limits.max_probes} judged sets is spent; keeping the {len(current)} layers found")
            break
        if moved:
            continue
        if parts >= len(current):
            break  # no single layer can be dropped
        parts = min(2 * parts, len(current))
    if not verdict.passed:
        say("no set of candidate layers in fp32 that could be tried makes every task pass")
        return SearchResult("bisection", [], [], base, probe.count, "cannot help", errors)
    if len(current) > limits.max_layers:
        # Within the budget, bisection may stop short of the smallest set: say what it found, not what is needed.
        say(f"the smallest set found keeps {len(current)} layers in fp32, more than the {limits.max_layers} the search "
            "keeps")
        return SearchResult("bisection", [], [], base, probe.count, "budget", errors)
    steps = [_bisection_step(probe, current, verdict, layer, base, errors) for layer in current]
    return SearchResult("bisection", list(current), steps, verdict, probe.count, "passed", errors)


def _split(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return [c for c in out if c]


def _bisection_step(probe: _Memo, chosen: list[Layer], verdict: Verdict, layer: Layer, base: Verdict,
                    errors: Mapping[Layer, float]) -> Step:
    """What `layer` buys among `chosen`: the judgement without it when that was judged, else the base."""
    without = probe.judged.get(frozenset(c for c in chosen if c != layer), base)
    return Step(layer, without, verdict, errors.get(layer, math.nan))


def _past(verdict: Verdict) -> str:
    """How far a failing verdict is past its limits, in words: its shortfall is relative to them."""
    return f"{verdict.shortfall:.1%} past the limits" if verdict.shortfall < 100 else "far past the limits"


def _name(layer: Layer) -> str:
    return str(layer[-1]) if isinstance(layer, tuple) and layer else str(layer)


# ----------------------------------------------------------------------------- does a mix pay off?


def cannot_pay_off(latency: Mapping[str, float], subject: str, compare: Iterable[str]) -> str | None:
    """The fastest of `compare` when `subject` is no faster than it (then layers in fp32, which only slow
    `subject` down, cannot make it worth having), else None. Names missing from `latency` are left out."""
    timed = [c for c in compare if c in latency]
    if subject not in latency or not timed:
        return None
    fastest = min(timed, key=latency.__getitem__)
    return fastest if latency[subject] >= latency[fastest] else None
