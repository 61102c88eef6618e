"""The lowering and its replay under NCCL's rules (docs/design.md, "Communication";
[Note: lowering]): every lowered schedule completes; the replay rejects what NCCL would
hang or mismatch on; the printed schedule; the bytes it counts."""
from __future__ import annotations

import itertools
import math

import pytest
from conftest import compiled
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncdiff.lowering import Comm, Group, Payload, ScheduleError, check, lower, replay
from asyncdiff.timeline import build_timeline

T = 9


def _timelines(n: int):
    """Every schedule shape of N = n the runtime runs: S 1–3, several W (an even W under
    ``official``), every stride-noise mode, cool-down and sync steps."""
    for stride, warmup, noise, cool, sync in itertools.product(
            (1, 2, 3), (1, 2, 3), ("fresh", "reuse", "official"), (0, 2), ((), (5,), (4, 6))):
        if noise == "official" and (stride > 2 or any(k % 2 for k in sync)):
            continue
        if any(not warmup <= k < T - cool for k in sync):
            continue
        yield build_timeline(n, stride, warmup, T, stride_noise=noise, cooldown=cool,
                             sync=sync)


def _world(lowered):
    return {p.rank: list(p.groups()) for p in lowered.programs}


@pytest.mark.parametrize("n,strategy", [(1, "balanced"), (2, "balanced"), (3, "balanced"),
                                        (4, "balanced"), (2, "shell_core"), (3, "shell_core"),
                                        (4, "shell_core")])
def test_every_lowered_schedule_completes_under_nccl_rules(n, strategy):
    """N 1–4 × S 1–3 × W 1–3 × stride noise × cool-down × sync, alone, with CFG-parallel
    (N = 1: plain CFG-parallel; N > 1: the hybrid) and with two replicas; contiguous and
    shell/core splits (the last stage feeding another)."""
    plan = compiled(n, strategy).plan
    count = 0
    for tl in _timelines(n):
        for groups, replicas in ((1, 1), (2, 1), (1, 2), (2, 2)):
            lowered = lower(tl, plan, groups=groups, replicas=replicas)
            got = check(lowered)
            assert got.groups == {r: len(g) for r, g in _world(lowered).items()}
            count += 1
    assert count >= 100


def test_hoisted_values_sent_once_per_run_complete_even_when_resent_every_round():
    """A plan whose heavy caption projection lives on one stage and is sent (hoisted): its
    hoist group completes before round 0 and, re-posted before every round (conditioning
    changing at every call), still completes."""
    plan = _caption_plan()
    assert any(h.home >= 0 for h in plan.hoisted)
    sent = [h for h in plan.hoisted if h.home >= 0]
    for tl in _timelines(3):
        lowered = lower(tl, plan, groups=2)
        # each sent value, from the first device of its home stage to every other device that
        # runs a stage reading it (stride copies too, if they ever run), once, in each group
        runs = [(a.device, a.stage) for r in tl.rounds for a in r.actions]
        want = 2 * sum(h.bytes * len({d for d, s in runs if s in h.consumers}
                                     - {min(d for d, s in runs if s == h.home)})
                       for h in sent)
        assert sum(p.hoist.bytes_sent for p in lowered.programs if p.hoist) == want > 0
        check(lowered)
        check(lowered, hoist_every_round=True)


def test_what_travels_is_what_the_plan_says():
    """Per parallel round: each value to each device of a stage that reads it, once; ε from
    each copy to every other device; a sequential round sends each value once per consumer
    stage, plus what the idle stride copies read next."""
    c = compiled(3)
    plan = c.plan
    tl = build_timeline(3, 2, 2, 6)
    lowered = lower(tl, plan)
    eps = math.prod(plan.output_shape) * 4
    by_stage = {s: sum(v.bytes for v in plan.values if s in v.consumers) for s in range(3)}
    # round 2 is parallel, round 3 reads it: devices 0 (E1), 1 (E2), 2 and 3 (E3 copies)
    got = {p.device: sum(c.payload.nbytes for g in p.rounds[2] if isinstance(g, Group)
                         for c in g.ops if c.op == "recv" and c.payload.kind == "values")
           for p in lowered.programs}
    assert got == {0: by_stage[0], 1: by_stage[1], 2: by_stage[2], 3: by_stage[2]}
    sent_eps = {p.device: sum(c.payload.nbytes for g in p.rounds[2] if isinstance(g, Group)
                              for c in g.ops if c.op == "send" and c.payload.kind == "eps")
                for p in lowered.programs}
    assert sent_eps == {0: 0, 1: 0, 2: 3 * eps, 3: 3 * eps}
    # the last warm-up round: fresh values between stages, then the copy (device 3) reads E3's
    fresh = sum(c.payload.nbytes for p in lowered.programs for g in p.rounds[1]
                if isinstance(g, Group) and g.phase.startswith("fresh")
                for c in g.ops if c.op == "send")
    assert fresh == sum(v.bytes * len(v.consumers) for v in plan.values)
    to_copy = sum(c.payload.nbytes for g in lowered.program(3).rounds[1]
                  if isinstance(g, Group) and g.phase == "publish"
                  for c in g.ops if c.op == "recv" and c.payload.kind == "values")
    assert to_copy == by_stage[2]


# --------------------------------------------------------------------------- the replay
def _payload(numel: int) -> Payload:
    return Payload("values", "float32", numel, names=("v",))


def test_two_ranks_that_each_receive_first_deadlock_and_fused_they_complete():
    """What the executor did before the lowering, at N = 2 (each rank's receive posted alone
    before its send): a hang under NCCL. The same operations in one group each: complete."""
    eps, vals = _payload(8), _payload(64)
    lone = {0: [Group(1, "publish", (Comm("recv", 1, eps),)),
                Group(1, "publish", (Comm("send", 1, vals),))],
            1: [Group(1, "publish", (Comm("recv", 0, vals),)),
                Group(1, "publish", (Comm("send", 0, eps),))]}
    with pytest.raises(ScheduleError, match=r"deadlock.*rank 0 waits in round 1 publish on "
                                            r"its recv from rank 1"):
        replay(lone)
    fused = {r: [Group(1, "publish", tuple(c for g in gs for c in g.ops))]
             for r, gs in lone.items()}
    assert replay(fused).matched == 2


def test_a_size_mismatch_and_an_unmatched_send_are_named():
    with pytest.raises(ScheduleError, match=r"rank 0 sends 8 float32 .* to rank 1, which "
                                            r"receives 64 float32"):
        replay({0: [Group(0, "publish", (Comm("send", 1, _payload(8)),))],
                1: [Group(0, "publish", (Comm("recv", 0, _payload(64)),))]})
    with pytest.raises(ScheduleError, match=r"round 3 publish: rank 0's send to rank 1 has no "
                                            r"matching receive"):
        replay({0: [Group(3, "publish", (Comm("send", 1, _payload(8)),))], 1: []})


def _swaps(streams):
    """Every swap, on one rank, of two of its operations in different groups with the same
    peer that differ in direction or size: a reordering its peer does not make."""
    for rank, groups in streams.items():
        ops = [(gi, oi, c) for gi, g in enumerate(groups) for oi, c in enumerate(g.ops)]
        for (ga, oa, a), (gb, ob, b) in itertools.combinations(ops, 2):
            if ga != gb and a.peer == b.peer and \
                    (a.op, a.payload.numel) != (b.op, b.payload.numel):
                yield rank, (ga, oa), (gb, ob)


def _swapped(streams, rank, at_a, at_b):
    groups = [list(g.ops) for g in streams[rank]]
    (ga, oa), (gb, ob) = at_a, at_b
    groups[ga][oa], groups[gb][ob] = groups[gb][ob], groups[ga][oa]
    out = dict(streams)
    out[rank] = [Group(g.round, g.phase, tuple(ops)) for g, ops in zip(streams[rank], groups)]
    return out


@pytest.mark.parametrize("n,stride,warmup,noise,groups", [
    (2, 1, 1, "fresh", 1), (3, 2, 2, "fresh", 1), (4, 1, 2, "reuse", 1),
    (3, 2, 2, "official", 1), (2, 2, 1, "fresh", 2)])
def test_swapping_two_of_one_ranks_actions_is_caught(n, stride, warmup, noise, groups):
    """The mutation test: each of these reorderings of one rank's program fails the replay
    (the unmutated program passes), so the replay checks the order it is given."""
    tl = build_timeline(n, stride, warmup, 7, stride_noise=noise)
    streams = _world(lower(tl, compiled(n).plan, groups=groups))
    replay(streams)
    swaps = list(_swaps(streams))
    assert len(swaps) >= 10
    for rank, a, b in swaps:
        with pytest.raises(ScheduleError):
            replay(_swapped(streams, rank, a, b))


def test_a_receive_split_off_and_posted_first_on_every_rank_hangs_every_parallel_schedule():
    """Unfuse every publish group into its receives, then its sends (the pre-lowering
    executor's order): with N >= 2 the first parallel round deadlocks."""
    for n, stride in ((2, 1), (3, 2), (4, 1)):
        tl = build_timeline(n, stride, 1, 5)
        streams = {}
        for rank, groups in _world(lower(tl, compiled(n).plan)).items():
            out = []
            for g in groups:
                if g.phase != "publish" or tl.rounds[g.round].sequential:
                    out.append(g)
                    continue
                for op in ("recv", "send"):
                    ops = tuple(c for c in g.ops if c.op == op)
                    if ops:
                        out.append(Group(g.round, g.phase, ops))
            streams[rank] = out
        with pytest.raises(ScheduleError, match=r"deadlock .* round 1 publish"):
            replay(streams)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), stride=st.integers(1, 3), warmup=st.integers(1, 4),
       steps=st.integers(4, 12), cooldown=st.integers(0, 3), noise=st.sampled_from(
           ["fresh", "reuse", "official"]), groups=st.sampled_from([1, 2]),
       replicas=st.sampled_from([1, 2]), sync=st.lists(st.integers(0, 12), max_size=3))
def test_random_schedules_complete(n, stride, warmup, steps, cooldown, noise, groups,
                                   replicas, sync):
    if noise == "official" and stride > 2:
        stride = 2
    warmup = min(warmup, steps)
    cooldown = min(cooldown, steps - warmup)
    sync = [k for k in sync if warmup <= k < steps - cooldown
            and not (noise == "official" and k % 2)]
    try:
        tl = build_timeline(n, stride, warmup, steps, stride_noise=noise, cooldown=cooldown,
                            sync=sync)
    except ValueError:  # e.g. official's load-only step as a sync step: refused by the timeline
        return
    check(lower(tl, compiled(n).plan, groups=groups, replicas=replicas))


# --------------------------------------------------------------------------- printing
def test_the_lowered_schedule_prints_as_a_grid():
    text = str(lower(build_timeline(3, 2, 2, 6), compiled(3).plan))
    lines = text.splitlines()
    assert lines[0].startswith("communication N=3 S=2 W=2 T=6")
    assert lines[1].split()[:6] == ["round", "phase", "rank0", "rank1", "rank2", "rank3"]
    assert "r2 par 2,3" in text and "fresh 0" in text and "publish" in text
    row = next(line for line in lines if line.startswith("r2 par 2,3"))
    assert row.split()[3] == "compute" and "E1" in row and "E3" in row
    assert lines[-1].startswith("sent per run: rank0 ")


def _caption_plan():
    import denoisers as D
    import torch

    from partition import PartitionRequest, compile_model
    torch.manual_seed(0)
    model, specs = D.CaptionDiT().eval(), D.CAPTION_SPECS
    return compile_model(model, specs, D.example(specs),
                         PartitionRequest(n=3, depth=None)).plan


def test_a_schedule_the_replay_rejects_is_refused_before_anything_is_posted(monkeypatch):
    """A lowering bug (here: every publish group posted receives-first as lone operations) is
    refused where an executor gets its program, naming the round, the phase and the pair,
    and no point-to-point call reaches torch.distributed."""
    import asyncdiff.lowering.programs as L
    from asyncdiff.distributed import trace
    from asyncdiff.lowering import checked_program

    orig_lower = L.lower

    def unfused(tl, plan, **kw):
        low = orig_lower(tl, plan, **kw)
        progs = []
        for p in low.programs:
            rounds = []
            for items in p.rounds:
                out = []
                for i in items:
                    if isinstance(i, Group) and i.phase == "publish":  # receives first
                        out += [Group(i.round, i.phase, (c,)) for c in
                                sorted(i.ops, key=lambda c: c.op != "recv")]
                    else:
                        out.append(i)
                rounds.append(tuple(out))
            progs.append(type(p)(p.rank, p.pipeline, p.device, p.hoist, tuple(rounds)))
        return type(low)(low.timeline, low.devices, low.groups, low.replicas, tuple(progs))

    monkeypatch.setattr(L, "lower", unfused)
    with trace.recording() as calls, pytest.raises(ScheduleError, match=(
            r"deadlock under NCCL's rules: rank 0 waits in round 1 publish on its recv from "
            r"rank 1, which posts it only in round 1 publish")):
        checked_program(build_timeline(2, 1, 1, 4), compiled(2).plan, 0)
    assert calls == []


def _dataflow(tl, plan, lowered) -> None:
    """Walk every rank's program and check what it holds when it computes: in a parallel
    round, every input of its stage as the round its action reads published it; in a
    sequential round, every input of its stage produced before the segment, fresh; after
    every round, the ε of each of the round's steps (computed or received)."""
    produced_at = {v.name: v.position for v in plan.values}
    for p in lowered.programs:
        held: dict[str, int] = {}
        for rnd, items in zip(tl.rounds, p.rounds):
            action = rnd.on(p.device)
            eps = set(action.eps_steps) if action else set()
            for item in items:
                if isinstance(item, Group):
                    for c in item.ops:
                        if c.op == "recv" and c.payload.kind == "values":
                            held.update(dict.fromkeys(c.payload.names, rnd.index))
                        if c.op == "recv" and c.payload.kind == "eps":
                            eps |= set(c.payload.steps)
                    continue
                inputs = plan.stages[action.stage].inputs
                if rnd.sequential:
                    need = [v for v in inputs if produced_at[v] < item.segments[0]]
                    want = rnd.index
                else:
                    need, want = inputs, action.inputs_round
                missing = [v for v in need if held.get(v) != want]
                assert not missing, (p.rank, rnd.index, item, missing, held)
            assert eps == set(rnd.steps), (p.rank, rnd.index, eps)
            if rnd.sequential and action is not None:  # what it received fresh, it holds
                held.update({v: rnd.index for v in plan.stages[action.stage].inputs})


@pytest.mark.parametrize("n,strategy", [(2, "balanced"), (3, "balanced"), (4, "balanced"),
                                        (3, "shell_core")])
def test_every_rank_holds_what_it_computes_on_from_the_round_it_reads(n, strategy):
    plan = compiled(n, strategy).plan
    for tl in _timelines(n):
        _dataflow(tl, plan, lower(tl, plan, groups=2, replicas=2))


def test_the_dataflow_check_catches_a_value_sent_a_round_late():
    """The check above can fail: drop one value message from every publish group of a
    parallel round, and the next round's reader is missing it."""
    plan = compiled(3).plan
    tl = build_timeline(3, 1, 1, 5)
    good = lower(tl, plan)
    _dataflow(tl, plan, good)
    progs = []
    for p in good.programs:
        rounds = [tuple(Group(i.round, i.phase, tuple(
            c for c in i.ops if not (c.payload.kind == "values" and i.round == 2)))
            if isinstance(i, Group) else i for i in items) for items in p.rounds]
        progs.append(type(p)(p.rank, p.pipeline, p.device, p.hoist, tuple(rounds)))
    bad = type(good)(good.timeline, good.devices, good.groups, good.replicas, tuple(progs))
    with pytest.raises(AssertionError):
        _dataflow(tl, plan, bad)
