"""The layer search as a strategy (`export.pipeline.layer_search`), judged by a scripted judge: which layers
it keeps, in what order, when it stops, what it costs, and when a mix cannot pay off. No engines here."""

from __future__ import annotations

import math

import pytest

from export.pipeline.layer_search import (
    Limits,
    Unjudgeable,
    Verdict,
    bisect_search,
    cannot_pay_off,
    is_informative,
    rank_order,
    ranked_search,
    search,
)

LAYERS = [f"L{i:02d}" for i in range(24)]


class Scripted:
    """Every task passes when the `needed` layers are all in fp32; each needed layer missing costs its
    weight (`costs`, default 1), and a `decoy` layer closes part of the gap without being needed."""

    def __init__(self, needed, *, costs=None, decoys=None, errors=None, passes=None):
        self.needed = set(needed)
        self.costs = costs or {}
        self.decoys = decoys or {}
        self.errors = errors
        self.passes = passes
        self.calls: list[frozenset] = []

    def judge(self, keep: frozenset) -> Verdict:
        self.calls.append(keep)
        passed = self.passes(keep) if self.passes else self.needed <= keep
        gap = sum(self.costs.get(n, 1.0) for n in self.needed - keep)
        gap -= sum(v for d, v in self.decoys.items() if d in keep)
        return Verdict(passed, 0.0 if passed else max(gap, 0.05), {"keep": sorted(keep)})

    def ranking(self):
        return self.errors


def ranking(top: list[str], rest: float = 0.01) -> dict[str, float]:
    """Every layer at `rest`, the `top` ones above it in that order."""
    errors = dict.fromkeys(LAYERS, rest)
    errors.update({name: 1.0 - 0.1 * i for i, name in enumerate(top)})
    return errors


def test_ranked_keeps_the_culprit_and_stops_at_the_first_pass():
    judge = Scripted({"L05"}, errors=ranking(["L05", "L01", "L02"]))
    said = []
    found = search(judge, LAYERS, say=said.append)
    assert found.strategy == "ranked" and found.passed and found.stop == "passed"
    assert found.chosen == ["L05"]
    # The base, then the window's layers one at a time down to the first that passes (L05 ranks first);
    # each set judged once.
    assert found.probes == 2 == len(judge.calls) == len(set(judge.calls))
    [step] = found.steps
    assert step.layer == "L05" and not step.before.passed and step.after.passed and step.error == 1.0
    assert said == ["trying 8 layer(s) in fp32, one at a time, until one passes"]


def test_ranked_takes_the_layer_that_closes_most_of_the_gap_first():
    # Both needed; L07 costs more, so it is kept first even though L03 ranks higher.
    judge = Scripted({"L03", "L07"}, costs={"L07": 3.0}, errors=ranking(["L03", "L07"]))
    found = ranked_search(judge, judge.errors)
    assert found.passed and found.chosen == ["L07", "L03"]
    assert [s.layer for s in found.steps] == ["L07", "L03"]
    assert found.steps[0].before.shortfall == 4.0 and found.steps[1].before.shortfall == 1.0


def test_ranked_prunes_a_layer_the_others_make_unnecessary():
    # L00 closes most of the gap alone, but L01 and L02 are what passing takes.
    judge = Scripted({"L01", "L02"}, costs={"L01": 0.5, "L02": 0.5}, decoys={"L00": 0.8},
                     errors=ranking(["L00", "L01", "L02"]))
    said = []
    found = ranked_search(judge, judge.errors, say=said.append)
    assert found.passed and found.chosen == ["L01", "L02"]
    assert [s.layer for s in found.steps] == ["L01", "L02"]
    assert "L00 is not needed once the others are in fp32; dropped" in said


def test_ranked_moves_down_the_ranking_when_a_window_does_not_help():
    # The culprit ranks 10th: the first window of 8 brings nothing, the next one finds it.
    judge = Scripted({"L10"}, errors=ranking([f"L{i:02d}" for i in range(20)]))
    said = []
    found = ranked_search(judge, judge.errors, Limits(shortlist=8), say=said.append)
    assert found.passed and found.chosen == ["L10"]
    assert said[1] == "trying 8 layer(s) in fp32, one at a time (ranks 9-16), until one passes"
    # The base, the first window whole, the second down to the culprit.
    assert found.probes == 1 + 8 + rank_order(judge.errors)[8:16].index("L10") + 1 < 1 + 8 + 8


def test_ranked_stops_when_the_next_layer_closes_little_of_what_is_left():
    # After L00 closed most of the gap, the best next layer closes under min_gain of the rest: the harness
    # should judge the rebuilt engine before adding more.
    needed = {"L00", "L01", "L02", "L03", "L04"}
    judge = Scripted(needed, costs={"L00": 10.0, **dict.fromkeys(sorted(needed - {"L00"}), 0.25)},
                     errors=ranking(["L00"]))
    found = ranked_search(judge, judge.errors, Limits(min_gain=0.5))
    assert not found.passed and found.stop == "small gain" and found.chosen == ["L00"]


@pytest.mark.parametrize("limits, stop", [(Limits(max_probes=5), "budget"), (Limits(max_layers=2), "too little")])
def test_ranked_respects_its_budget(limits, stop):
    # Four needed layers, each found in its own window step: the budget of judged sets runs out first; with
    # room for two layers, none closes the half of the gap that passing within two would take.
    needed = {"L00", "L01", "L02", "L03"}
    judge = Scripted(needed, errors=ranking(sorted(needed)))
    found = ranked_search(judge, judge.errors, limits)
    assert not found.passed and found.stop == stop
    assert found.probes <= limits.max_probes and len(found.chosen) <= limits.max_layers
    assert len(judge.calls) == found.probes


def test_ranked_says_when_no_layer_helps():
    judge = Scripted(set(), passes=lambda keep: False, errors=ranking(["L00"]))
    said = []
    found = ranked_search(judge, judge.errors, Limits(max_probes=200), say=said.append)
    assert not found.passed and found.stop == "no gain" and found.chosen == []
    # Two windows in a row without a layer that helps: the layers further down the ranking add less error.
    assert found.probes == 1 + 2 * 8 and len(said) == 2


def test_ranked_does_not_keep_layers_that_close_too_little_to_pass_within_its_layers():
    # Twenty layers each close 1/20 of the gap: sixteen of them (the most the search keeps) cannot pass,
    # so none is kept, and the search stops after two windows instead of spending its budget on them.
    needed = set(LAYERS[:20])
    judge = Scripted(needed, errors=ranking(sorted(needed)))
    found = ranked_search(judge, judge.errors, Limits(max_probes=200))
    assert not found.passed and found.stop == "too little" and found.chosen == []
    assert found.probes == 1 + 2 * 8


def test_a_kept_layer_starts_the_count_of_idle_windows_again():
    # Ranks 1-8 bring nothing; L10 (ranks 11th) closes most of the gap, L12 (13th) the rest. After L10 is
    # kept, ranks 1-8 bring nothing again: a second idle window, but not two in a row, so L12 is found.
    # (min_gain 0.9: L10's step is no big one, after which an empty window would end the round.)
    judge = Scripted({"L10", "L12"}, costs={"L10": 3.0, "L12": 1.0},
                     errors={name: 1.0 - 0.04 * i for i, name in enumerate(LAYERS)})
    found = ranked_search(judge, judge.errors, Limits(idle_windows=2, min_gain=0.9))
    assert found.passed and found.chosen == ["L10", "L12"]


def test_a_ranking_that_runs_out_says_the_layers_that_helped_closed_too_little():
    # Ten candidates, each a tenth of the gap, room for four layers: the ranking runs out first.
    needed = set(LAYERS[:10])
    judge = Scripted(needed, errors={n: 1.0 - 0.05 * i for i, n in enumerate(sorted(needed))})
    found = ranked_search(judge, judge.errors, Limits(max_layers=4, idle_windows=5))
    assert not found.passed and found.stop == "too little" and found.chosen == []


@pytest.mark.parametrize("max_layers, kept", [(4, 4), (3, 0)])
def test_a_layer_helps_when_it_closes_a_share_of_the_gap_the_layers_left_can_finish(max_layers, kept):
    # Four layers each close a quarter of the gap: with room for four they are kept and pass; with three not.
    needed = {"L00", "L01", "L02", "L03"}
    judge = Scripted(needed, errors=ranking(sorted(needed)))
    found = ranked_search(judge, judge.errors, Limits(max_layers=max_layers))
    assert len(found.chosen) == kept and found.passed == (kept == 4)


def test_a_round_that_keeps_no_ranked_layer_goes_on_by_bisection():
    # Three layers pass only together: none closes any of the gap alone, so the ranked windows keep nothing;
    # bisection from every candidate in fp32 finds the three, the ranked round's sets not judged again.
    needed = {"L03", "L11", "L19"}
    judge = Scripted(needed, errors=ranking(["L00", "L01"]))
    judge.judge = _all_or_nothing(judge.judge, needed)
    said = []
    found = search(judge, LAYERS, say=said.append)
    assert found.passed and found.strategy == "bisection" and sorted(found.chosen) == sorted(needed)
    assert "no top-ranked layer closes enough of the gap alone; trying every candidate layer in fp32" in said
    assert said[said.index("no top-ranked layer closes enough of the gap alone; trying every candidate layer in "
                           "fp32") + 1] == "all 24 candidate layers in fp32 pass; narrowing them down by halves"
    assert len(judge.calls) == len(set(judge.calls)) == found.probes <= Limits().max_probes


def test_a_round_whose_every_candidate_in_fp32_fails_says_layers_cannot_help():
    # The error is not in the candidates (as an fp16 graph's normalisations): one set past the ranked windows.
    judge = Scripted(set(), passes=lambda keep: False, errors=ranking(["L00"]))
    said = []
    found = search(judge, LAYERS, say=said.append)
    assert not found.passed and found.stop == "cannot help" and found.chosen == []
    assert found.probes == 1 + 2 * 8 + 1 == len(judge.calls)
    assert said[-1] == ("even all 24 candidate layers in fp32 fail a task's gate (5.0% past the limits, against 5.0% "
                        "past the limits with none): layers in fp32 cannot help")


def test_a_round_that_kept_a_layer_does_not_bisect():
    # L00 closes most of the gap, then nothing more does: the harness rebuilds with L00 and searches again.
    judge = Scripted(set(), passes=lambda keep: False, errors=ranking(["L00"]))
    scripted = judge.judge
    judge.judge = lambda keep: Verdict(False, 0.1 if "L00" in keep else 1.0, scripted(keep).detail)
    found = search(judge, LAYERS)
    assert found.strategy == "ranked" and found.chosen == ["L00"] and found.stop == "small gain"
    assert frozenset(LAYERS) not in judge.calls


def _all_or_nothing(judge, needed):
    """`judge` with a gap that closes only when every `needed` layer is in fp32: none helps alone."""
    def judged(keep):
        verdict = judge(keep)
        return verdict if verdict.passed else Verdict(False, 1.0, verdict.detail)
    return judged


def test_without_a_ranking_the_search_bisects_to_the_culprit():
    judge = Scripted({"L17"})
    said = []
    found = search(judge, LAYERS, say=said.append)
    assert found.strategy == "bisection" and found.passed and found.chosen == ["L17"]
    assert said[0] == "all 24 candidate layers in fp32 pass; narrowing them down by halves"
    # Halving: about two tries per halving of 24 layers, far fewer than one per layer.
    assert found.probes <= 2 + 2 * math.ceil(math.log2(len(LAYERS))) + 2
    [step] = found.steps
    assert step.layer == "L17" and step.after.passed and not step.before.passed


def test_bisection_finds_a_set_from_which_no_layer_can_be_dropped():
    judge = Scripted({"L02", "L13", "L21"})
    found = bisect_search(judge, LAYERS)
    assert found.passed and sorted(found.chosen) == ["L02", "L13", "L21"]
    for layer in found.chosen:  # 1-minimal: each one is needed
        assert not judge.judge(frozenset(found.chosen) - {layer}).passed


def test_bisection_does_without_a_first_check_it_cannot_make():
    """A graph with every layer in fp32 may be refused (ONNX Runtime's fp16 graph with nothing left in fp16):
    the search narrows down by halves all the same."""
    class Refusing(Scripted):
        def judge(self, keep):
            if len(keep) == len(LAYERS):
                raise Unjudgeable("no layer left in fp16")
            return super().judge(keep)

    said = []
    found = bisect_search(Refusing({"L20"}), LAYERS, say=said.append)
    assert found.passed and found.chosen == ["L20"]
    assert said[0] == "all 24 candidate layers in fp32 cannot be tried at once; narrowing them down by halves"
    found = bisect_search(Refusing(set(), passes=lambda keep: False), LAYERS, Limits(max_probes=30))
    assert not found.passed and found.stop == "cannot help" and found.probes <= 30


def test_a_flat_ranking_is_not_informative_so_the_search_bisects():
    judge = Scripted({"L09"}, errors=dict.fromkeys(LAYERS, 5e-4))
    said = []
    found = search(judge, LAYERS, say=said.append)
    assert found.strategy == "bisection" and found.chosen == ["L09"]
    assert said[0] == "the ranking of 24 layers does not tell them apart; bisecting instead"


def test_bisection_says_when_layers_in_fp32_cannot_help():
    judge = Scripted(set(), passes=lambda keep: False)
    said = []
    found = bisect_search(judge, LAYERS, say=said.append)
    assert not found.passed and found.stop == "cannot help" and found.chosen == []
    assert found.probes == 2  # the engine as built, and every candidate in fp32
    assert "layers in fp32 cannot help" in said[0]


def test_bisection_respects_its_budget():
    needed = {f"L{i:02d}" for i in range(0, 24, 3)}  # 8 layers spread out: many tries to isolate
    judge = Scripted(needed)
    found = bisect_search(judge, LAYERS, Limits(max_probes=10, max_layers=24))
    assert found.passed and found.probes <= 10 and needed <= set(found.chosen)
    found = bisect_search(Scripted(needed), LAYERS, Limits(max_layers=4))
    assert not found.passed and found.stop == "budget" and found.chosen == []


def test_an_engine_that_passes_needs_no_layers():
    for strategy in (lambda j: ranked_search(j, ranking(["L00"])), lambda j: bisect_search(j, LAYERS)):
        found = strategy(Scripted(set()))
        assert found.passed and found.chosen == [] and found.probes == 1


@pytest.mark.parametrize("errors, informative", [
    (None, False), ({}, False), (dict.fromkeys(LAYERS, 1e-3), False), (dict.fromkeys(LAYERS, 0.0), False),
    (ranking(["L00"], rest=1e-3), True), ({**dict.fromkeys(LAYERS, 1e-3), "L04": math.inf}, True),
])
def test_a_ranking_is_informative_when_some_layer_stands_out(errors, informative):
    assert is_informative(errors) is informative


def test_a_mix_cannot_pay_off_when_it_is_no_faster_than_what_it_must_beat():
    latency = {"bf16": 12.0, "fp16": 9.0, "fp32": 11.0}
    assert cannot_pay_off(latency, "bf16", ["fp16", "fp32"]) == "fp16"
    assert cannot_pay_off(latency, "fp16", ["fp32"]) is None
    assert cannot_pay_off({**latency, "fp16": 11.0}, "fp16", ["fp32"]) == "fp32"  # equal is no faster
    assert cannot_pay_off(latency, "int8", ["fp16"]) is None  # not timed: nothing to say
    assert cannot_pay_off(latency, "fp16", []) is None


def test_the_build_says_when_even_every_layer_in_fp32_would_not_do_after_layers_were_kept():
    # A first round kept two layers, the rebuilt engine still failed, and the next round found that every
    # candidate in fp32 fails too: the message says both, not only that two layers were tried.
    from export.pipeline.fallback import _message

    message = _message("fp16", "failed", 2, {}, {}, "cannot help")
    assert message == ("could not make every task pass (2 layers in fp32 tried); even every candidate layer in fp32 "
                       "does not make every task pass; the fp16 engine stays as it was built")
    assert _message("fp16", "failed", 2, {}, {}, "too little").startswith(
        "could not make every task pass (2 layers in fp32 tried); the fp16")
