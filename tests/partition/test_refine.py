"""Stage-level truth ([Note: refinement], partition/refine.py), granularity where it matters
(the balanced strategy's local deepening) and the clock of [Note: the CPU clock]."""
from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest

import partition.graph_backend
from partition import PartitionRequest, compile_graph
from partition.plan import Plan
from partition.refine import refine
from partition.strategies.balanced import stage_imbalance
from partition.strategies.base import Assignment
from partition.strategies.registry import get_strategy
from partition.timing import host_clock
from partition.verify import Verified

MS_PER_GFLOP = 1e-9 * 1e3  # the tests' "true" time: 1 ms per GFLOP (deterministic)


def _timed_graph(tiny, skew: float):
    """The tiny UNet's graph under a time cost model that is wrong: every node of the first
    half of the trunk costs ``skew`` times its true time (true: its FLOPs at a fixed rate)."""
    g = tiny.graph
    half = {g.trunk[i] for i in range(g.size // 2)}
    ms = {k: v * MS_PER_GFLOP * (skew if k in half else 1.0) for k, v in g.costs.flops.items()}
    costs = dataclasses.replace(g.costs, ms=ms, repeats=1, device="cpu", clock="test")
    return partition.graph_backend.build_graph(g.captured, costs, "time")


def _true_ms(graph, staged) -> tuple[float, ...]:
    """Each stage's true time: its trunk nodes and the conditioning it replicates."""
    fl = graph.costs.flops
    out = []
    for s in range(staged.n):
        segs = staged.stage_segments(s)
        nodes = {graph.trunk[i] for sg in segs for i in range(sg.start, sg.stop)}
        nodes |= {c for sg in segs for c in sg.conditioning}
        out.append(sum(fl[k] for k in nodes) * MS_PER_GFLOP)
    return tuple(out)


@pytest.fixture
def true_clock(sd15, monkeypatch):
    """The stages are verified for real (bit for bit against eager); their times are the
    true ones (:func:`_true_ms`) instead of a clock's. Records every verified run."""
    runs = []
    real = partition.graph_backend.verify_stages

    def verify(graph, staged, inputs, **kw):
        v = real(graph, staged, inputs, **kw)
        runs.append(v.note)
        return dataclasses.replace(v, stage_ms=_true_ms(graph, staged))
    monkeypatch.setattr(partition.graph_backend, "verify_stages", verify)
    return runs


def test_refinement_corrects_a_wrong_cost_model_on_the_stages_times(sd15, true_clock):
    """The cost model overrates the first half of the network 3x: its split leaves the
    first stage light. Measured on the stages, the model is corrected and the split cut
    again; the plan is the round measured best, and its balance is the one measured."""
    graph = _timed_graph(sd15, skew=3.0)
    request = PartitionRequest(n=3, refine=3, target=1.01)
    c = compile_graph(graph, request, strategy="balanced", cost_model="time", name="sd15",
                      config_hash="", inputs=sd15.inputs, threads=1)
    m = c.plan.measured
    first, last = m.rounds[0], m.rounds[-1]
    assert len(m.rounds) >= 2 and len(true_clock) == len(m.rounds)
    assert all(note.startswith("exact") for note in true_clock)  # every round verified
    assert first.imbalance > 1.1  # the wrong model's split, measured
    assert first.predicted_imbalance < first.imbalance  # … which the model did not know
    assert m.stage_ms == _true_ms(graph, c.staged)  # the plan's times: the chosen stages'
    assert c.plan.time_imbalance == min(r.imbalance for r in m.rounds) < first.imbalance
    truth = dataclasses.replace(graph, weights=np.array(
        [graph.costs.flops[k] * MS_PER_GFLOP for k in graph.trunk]))
    best = get_strategy("balanced")(truth, request)
    optimum = stage_imbalance(truth, [i for i in range(1, truth.size)
                                      if best.stage_of[i] != best.stage_of[i - 1]], 3)
    assert c.plan.time_imbalance <= optimum * 1.03, (c.plan.time_imbalance, optimum)
    assert m.outcome and "round" in m.outcome
    assert Plan.from_json(c.plan.to_json()) == c.plan  # the rounds round-trip


def test_a_refinement_that_cannot_converge_says_so_with_its_spread():
    """Stage times that do not repeat (each timing of a stage 1x or 2x its cost, in turn):
    the refinement stops, keeps the round it measured best, says it did not reach the target
    and gives the spread it saw; the balance it reports is a measured one."""
    factors = itertools.cycle([(1.0, 2.0), (2.0, 1.0)])
    true = np.ones(12)
    seen: list[tuple[float, ...]] = []

    def cut(w):
        prefix = np.cumsum(w)
        c = int(np.searchsorted(prefix, prefix[-1] / 2)) + 1
        return Assignment.from_cuts([min(max(c, 1), 11)], 12, "half")

    def measure(a):
        so = np.asarray(a.stage_of)
        ms = tuple(float(true[so == s].sum() * f) for s, f in zip(range(2), next(factors)))
        seen.append(ms)
        return Verified("exact: test", ms, sum(ms), spread=1.0)

    out = refine(true.copy(), cut=cut,
                 predict=lambda a, w: np.array([w[np.asarray(a.stage_of) == s].sum()
                                                for s in range(2)]),
                 build=lambda a: a, measure=measure, rounds=4, target=1.02)
    assert "did not reach the target 1.02" in out.outcome
    assert "two timings of one stage by up to 100%" in out.outcome
    assert out.verified.stage_ms in seen
    assert out.imbalance == min(r.imbalance for r in out.rounds)


def test_deepening_cuts_inside_a_block_where_its_depth_cannot_balance(sd15):
    """At depth 2 the tiny UNet has few blocks and no 4-way split near the target; allowed
    to go deeper, the balanced strategy adds boundaries inside the blocks around its cuts,
    and the split it finds is better, says so, and compiles exactly."""
    shallow = sd15.compile(PartitionRequest(n=4, depth=2))
    deep = compile_graph(sd15.graph, PartitionRequest(n=4, depth=2, deepen=3, target=1.0),
                         strategy="balanced", cost_model="flops", name="sd15",
                         config_hash="", inputs=sd15.inputs, threads=1)
    assert deep.plan.imbalance < shallow.plan.imbalance
    assert any("cuts below depth 2" in note for note in deep.plan.notes)
    assert deep.plan.verification.startswith("exact")
    assert not any("below depth" in note for note in shallow.plan.notes)
    # the candidates it added are local: far fewer than every boundary at the deeper level
    g = sd15.graph
    from partition.strategies.balanced import deepened
    cands, cuts, level = deepened(g, PartitionRequest(n=4, depth=2, deepen=3, target=1.0),
                                  g.candidates(2), [])
    assert level == 5 and len(cands) < len(g.candidates(5))


def test_deepening_is_off_where_depth_already_reaches_the_target(sd15):
    request = PartitionRequest(n=2, depth=4, target=1.03)
    plain = sd15.compile(request).plan
    assert plain.imbalance <= 1.03
    assert sd15.compile(dataclasses.replace(request, deepen=4)).plan.plan_hash == plain.plan_hash


def test_the_host_clock_at_one_thread_does_not_count_time_off_the_core():
    """At one intra-op thread the stages are timed on this thread's CPU time: time the
    scheduler gives to other processes (here: a sleep) is not counted; with more threads
    the wall clock is kept (the pool's work is on other threads)."""
    for threads, counts in ((1, False), (2, True)):
        clock = host_clock(threads)
        t0 = clock()
        time.sleep(0.3)
        assert (clock() - t0 > 0.25) == counts


def test_refinement_stops_at_once_when_the_first_split_is_measured_within_target():
    """A model that is right: one round, the verification's own run; no forward more."""
    calls = itertools.count()

    def measure(a):
        next(calls)
        return Verified("exact: test", (5.0, 5.0), 10.0)

    out = refine(np.ones(10), cut=lambda w: Assignment.from_cuts([5], 10, "half"),
                 predict=lambda a, w: np.array([5.0, 5.0]), build=lambda a: a,
                 measure=measure, rounds=3, target=1.02)
    assert next(calls) == 1 and len(out.rounds) == 1
    assert out.outcome == "measured imbalance 1.000 <= target 1.02 in 1 round(s)"
