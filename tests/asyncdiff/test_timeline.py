"""The timeline against hand-worked schedules (docs/design.md §2) and its invariants (hypothesis).

Expected tables are written from docs/design.md §2 and the paper by hand, not from the code.
A row is (device, stage, t_step, latent_step, inputs_round, eps_steps); inputs_round is the
round whose published cross-stage values the action reads.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings, strategies as st

from asyncdiff.timeline import Timeline, build_timeline, format_grid, validate


def rows(tl: Timeline) -> list[list[tuple]]:
    return [[(a.device, a.stage, a.t_step, a.latent_step, a.inputs_round, a.eps_steps)
             for a in rnd.actions] for rnd in tl.rounds]


def test_n2_s1_w1_t4_by_hand():
    # Warm-up step 0 runs E¹ then E² fresh on x0, τ0. From step 1 on, E¹ runs on x_k while E²
    # reads E¹'s value from the step before: ε_k depends on x_{k−1} (Eq. 5 with N = 2).
    tl = build_timeline(n=2, stride=1, warmup=1, steps=4)
    assert tl.devices == 2
    assert [r.steps for r in tl.rounds] == [(0,), (1,), (2,), (3,)]
    assert [r.kind for r in tl.rounds] == ["warmup", "parallel", "parallel", "parallel"]
    assert rows(tl) == [
        [(0, 0, 0, 0, 0, ()), (1, 1, 0, 0, 0, (0,))],
        [(0, 0, 1, 1, 0, ()), (1, 1, 1, 1, 0, (1,))],
        [(0, 0, 2, 2, 1, ()), (1, 1, 2, 2, 1, (2,))],
        [(0, 0, 3, 3, 2, ()), (1, 1, 3, 3, 2, (3,))],
    ]
    # What E² consumed at step 3: E¹'s output of round 2, computed on x2 with τ2.
    src = tl.rounds[2].publisher(0)
    assert (src.latent_step, src.t_step) == (2, 2)


def test_n3_s2_w1_t6_by_hand():
    # 4 devices. Batches (1,2), (3,4), (5). E¹, E² run once per batch fed τ of the batch's last
    # step, E¹ on x of its first step; E³ copy j (device 2+j) fed τ_{k+j}, both on the previous
    # round's values; the last batch is short, so device 3 idles.
    tl = build_timeline(n=3, stride=2, warmup=1, steps=6)
    assert tl.devices == 4
    assert [r.steps for r in tl.rounds] == [(0,), (1, 2), (3, 4), (5,)]
    assert rows(tl) == [
        [(0, 0, 0, 0, 0, ()), (1, 1, 0, 0, 0, ()), (2, 2, 0, 0, 0, (0,))],
        [(0, 0, 2, 1, 0, ()), (1, 1, 2, 1, 0, ()), (2, 2, 1, 1, 0, (1,)), (3, 2, 2, 1, 0, (2,))],
        [(0, 0, 4, 3, 1, ()), (1, 1, 4, 3, 1, ()), (2, 2, 3, 3, 1, (3,)), (3, 2, 4, 3, 1, (4,))],
        [(0, 0, 5, 5, 2, ()), (1, 1, 5, 5, 2, ()), (2, 2, 5, 5, 2, (5,))],
    ]
    # Paper §1.5: ε³(·,t) and ε³(·,t−1) share one input, E² of the previous batch. For steps 3
    # and 4 that is E² of round 1 (fed τ2), which read E¹ of round 0 (x0, τ0).
    e2 = tl.rounds[1].publisher(1)
    assert (e2.t_step, e2.inputs_round) == (2, 0)
    assert tl.rounds[0].publisher(0).latent_step == 0
    # E² at round 2 reads E¹ of round 1: x1 with τ2 (the latent paired with the next τ, Fig. 4).
    e1 = tl.rounds[1].publisher(0)
    assert (e1.latent_step, e1.t_step) == (1, 2)
    # The publishing copy of E³ is the one fed the batch's last step.
    assert tl.rounds[1].publisher(2).device == 3 and tl.rounds[3].publisher(2).device == 2


def test_n3_s2_reuse_by_hand():
    # Official code: one E³ run per batch (τ_k), its output used as ε for the whole batch.
    tl = build_timeline(n=3, stride=2, warmup=1, steps=6, stride_noise="reuse")
    assert tl.devices == 3
    assert rows(tl)[1:] == [
        [(0, 0, 2, 1, 0, ()), (1, 1, 2, 1, 0, ()), (2, 2, 1, 1, 0, (1, 2))],
        [(0, 0, 4, 3, 1, ()), (1, 1, 4, 3, 1, ()), (2, 2, 3, 3, 1, (3, 4))],
        [(0, 0, 5, 5, 2, ()), (1, 1, 5, 5, 2, ()), (2, 2, 5, 5, 2, (5,))],
    ]


def test_official_even_warmup_has_a_load_only_step():
    """The public code at S = 2 (docs/design.md §2): batches start at odd k ≥ W; with an
    even W step W computes nothing and re-emits ε_{W−1}."""
    tl = build_timeline(n=3, stride=2, warmup=2, steps=8, stride_noise="official")
    assert tl.devices == 3
    assert [r.steps for r in tl.rounds] == [(0,), (1, 2), (3, 4), (5, 6), (7,)]
    assert tl.rounds[1].sequential and tl.rounds[1].eps_source(2).eps_steps == (1, 2)
    assert tl.round_of(2) is tl.rounds[1]
    # the first batch (k = 3) reads what the last warm-up round published; E³ fed τ_3
    assert rows(tl)[2] == [(0, 0, 4, 3, 1, ()), (1, 1, 4, 3, 1, ()), (2, 2, 3, 3, 1, (3, 4))]


@pytest.mark.parametrize("n,stride,warmup,steps", [(3, 2, 1, 8), (2, 2, 3, 9), (4, 2, 9, 50),
                                                   (3, 1, 2, 6), (2, 2, 8, 8), (1, 2, 2, 6)])
def test_official_is_reuse_where_the_code_aligns_batches_from_w(n, stride, warmup, steps):
    """Odd W, S = 1, W = T, N = 1: nothing to realign, official == reuse."""
    official = build_timeline(n, stride, warmup, steps, stride_noise="official")
    reuse = build_timeline(n, stride, warmup, steps, stride_noise="reuse")
    assert official.rounds == reuse.rounds


def test_official_batches_at_even_steps_fail_validation():
    import dataclasses

    grouped_from_w = build_timeline(n=3, stride=2, warmup=2, steps=8, stride_noise="reuse")
    with pytest.raises(ValueError, match="official: a batch starts at step 2"):
        validate(dataclasses.replace(grouped_from_w, stride_noise="official"))


def test_official_refuses_strides_the_public_code_lacks():
    with pytest.raises(ValueError, match=r"^stride=3 with stride_noise='official'; allowed: 1, 2"):
        build_timeline(n=2, stride=3, warmup=1, steps=6, stride_noise="official")


def test_time_shift_paper_example():
    # App. A: 50 steps, W=2: the network is fed indices 0, 1, 1, 2, …, 48; the scheduler keeps τ_k.
    tl = build_timeline(n=2, stride=1, warmup=2, steps=50, time_shift=True)
    fed = [tl.round_of(k).eps_source(k).t_step for k in range(50)]
    assert fed == [0, 1] + list(range(1, 49))
    assert all(a.t_step == fed[r.steps[0]] for r in tl.rounds for a in r.actions)


def test_time_shift_stride2():
    # Paper §1.6, S=2: every index moves back one; E¹ gets τ_k with x_k, copy 0 gets τ_{k−1}.
    tl = build_timeline(n=3, stride=2, warmup=1, steps=6, time_shift=True)
    assert [(a.device, a.t_step) for a in tl.rounds[2].actions] == [(0, 3), (1, 3), (2, 2), (3, 3)]
    assert [(a.device, a.t_step) for a in tl.rounds[0].actions] == [(0, 0), (1, 0), (2, 0)]


def test_time_shift_clamps_at_zero():
    tl = build_timeline(n=1, stride=1, warmup=0, steps=3, time_shift=True)
    assert [r.actions[0].t_step for r in tl.rounds] == [0, 0, 1]


@pytest.mark.parametrize("kwargs, key", [
    (dict(n=0, stride=1, warmup=1, steps=4), "n="),
    (dict(n=2, stride=0, warmup=1, steps=4), "stride="),
    (dict(n=2, stride=1, warmup=-1, steps=4), "warmup="),
    (dict(n=2, stride=1, warmup=5, steps=4), "warmup="),
    (dict(n=2, stride=1, warmup=0, steps=4), "warmup="),
    (dict(n=2, stride=1, warmup=1, steps=0), "steps="),
    (dict(n=2.0, stride=1, warmup=1, steps=4), "n="),
    (dict(n=2, stride=True, warmup=1, steps=4), "stride="),
    (dict(n=2, stride=1, warmup=1, steps=4, stride_noise="stale"), "stride_noise="),
    (dict(n=2, stride=1, warmup=1, steps=4, time_shift="yes"), "time_shift="),
    (dict(n=2, stride=1, warmup=1, steps=4, cooldown=-1), "cooldown="),
    (dict(n=2, stride=1, warmup=2, steps=4, cooldown=3), "cooldown="),
    (dict(n=2, stride=1, warmup=2, steps=6, cooldown=1, sync=[1]), "sync="),
    (dict(n=2, stride=1, warmup=2, steps=6, cooldown=1, sync=[5]), "sync="),
    (dict(n=2, stride=2, warmup=1, steps=6, stride_noise="official", sync=[3]), "sync="),
    (dict(n=2, stride=2, warmup=2, steps=6, stride_noise="official", sync=[2]), "sync="),
])
def test_bad_inputs_name_key_and_allowed(kwargs, key):
    with pytest.raises(ValueError, match="allowed") as err:
        build_timeline(**kwargs)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
    if key == "stride_noise=":
        assert "fresh, reuse, official" in str(err.value)


def test_warmup_zero_allowed_without_stage_boundary():
    tl = build_timeline(n=1, stride=2, warmup=0, steps=3)
    assert [r.steps for r in tl.rounds] == [(0, 1), (2,)]
    assert all(a.inputs_round is None for r in tl.rounds for a in r.actions)


def _replace_action(tl: Timeline, r: int, d: int, **changes) -> Timeline:
    rnd = tl.rounds[r]
    acts = tuple(dataclasses.replace(a, **changes) if a.device == d else a for a in rnd.actions)
    rounds = list(tl.rounds)
    rounds[r] = dataclasses.replace(rnd, actions=acts)
    return dataclasses.replace(tl, rounds=tuple(rounds))


@pytest.mark.parametrize("mutation, message", [
    (dict(r=2, d=1, inputs_round=0), "reads round 0"),          # two rounds stale
    (dict(r=2, d=1, inputs_round=2), "reads round 2"),          # fresh inside a parallel round
    (dict(r=0, d=1, inputs_round=None), "fresh values"),        # warm-up not fresh
    (dict(r=1, d=2, eps_steps=(1, 2)), "ε for steps"),          # step 2 gets two ε
    (dict(r=1, d=3, eps_steps=()), "ε for steps"),              # step 2 gets none
    (dict(r=1, d=1, eps_steps=(2,)), "ε for steps"),            # ε from a non-last stage
    (dict(r=1, d=3, device=2), "one action per device"),        # two actions on one device
    (dict(r=1, d=3, publishes=False), "publish exactly once"),
    (dict(r=2, d=0, latent_step=4), "latent"),
    (dict(r=1, d=0, t_step=3), "beyond the round"),             # fed a future timestep
])
def test_validate_catches_broken_rules(mutation, message):
    tl = build_timeline(n=3, stride=2, warmup=1, steps=6)
    validate(tl)
    r, d = mutation.pop("r"), mutation.pop("d")
    with pytest.raises(ValueError, match=message):
        validate(_replace_action(tl, r, d, **mutation))


def test_validate_catches_device_count_and_coverage():
    tl = build_timeline(n=3, stride=2, warmup=1, steps=6)
    with pytest.raises(ValueError, match="devices"):
        validate(dataclasses.replace(tl, devices=3))
    with pytest.raises(ValueError, match="cover steps"):
        validate(dataclasses.replace(tl, rounds=tl.rounds[:-1]))


def test_grid_n3_s2():
    text = str(build_timeline(n=3, stride=2, warmup=1, steps=6))
    assert text == format_grid(build_timeline(n=3, stride=2, warmup=1, steps=6))
    lines = text.splitlines()
    assert lines[1].split() == ["round", "steps", "dev0", "dev1", "dev2", "dev3"]
    assert "E3 τ1 ←r0 →ε1" in lines[3] and "E3 τ2 ←r0 →ε2" in lines[3]
    assert "E1 x3 τ4" in lines[4] and "E2 τ4 ←r1" in lines[4]
    assert lines[2].rstrip().endswith("·") and lines[5].rstrip().endswith("·")


params = st.integers(1, 5).flatmap(lambda n: st.integers(1, 4).flatmap(
    lambda s: st.integers(1, 25).flatmap(lambda t: st.tuples(
        st.just(n), st.just(s), st.integers(1 if n > 1 else 0, t), st.just(t),
        st.booleans(), st.sampled_from(["fresh", "reuse", "official"])))))


@settings(max_examples=300, deadline=None)
@given(params)
def test_invariants(p):
    n, s, w, t, shift, noise = p
    if noise == "official" and s > 2:
        s = 2
    tl = build_timeline(n, s, w, t, time_shift=shift, stride_noise=noise)
    hold = noise == "official" and s == 2 and n > 1 and w % 2 == 0 and w < t
    validate(tl)
    assert tl.devices == (n - 1 + s if noise == "fresh" else n)
    eps = sorted(k for r in tl.rounds for a in r.actions for k in a.eps_steps)
    assert eps == list(range(t))
    assert all(tl.round_of(k).eps_source(k).stage == n - 1 for k in range(t))
    assert len(tl.parallel_rounds) == math.ceil((t - w - hold) / s)
    assert sum(r.sequential for r in tl.rounds) == w
    if noise == "official" and s == 2 and n > 1:   # the public code's batches: odd k
        assert all(r.steps[0] % 2 == 1 for r in tl.parallel_rounds)
    for r in tl.rounds:
        assert r.eps_steps == r.steps
        for a in r.actions:
            assert a.device == tl.device_of(a.stage, a.copy)
            assert tl.stage_inputs_round(r.index, a.stage) == a.inputs_round
            if r.sequential:   # warm-up: fed τ_k, never shifted
                assert a.t_step == r.steps[0]
            elif a.stage < n - 1:   # non-last stages: τ of the batch's last step
                assert a.t_step == max(r.steps[-1] - shift, 0)
            else:   # copy j: τ_{k+j}
                assert a.t_step == max(r.steps[a.copy] - shift, 0)
    if w == t:
        assert all(r.sequential for r in tl.rounds)
    grid = format_grid(tl)
    assert all(f"dev{d}" in grid.splitlines()[1].split() for d in range(tl.devices))
    assert len(grid.splitlines()) == len(tl.rounds) + 2


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 20), st.integers(1, 20), st.sampled_from(["fresh", "reuse"]))
def test_single_stage_stride1_is_sequential(w, t, noise):
    w = min(w, t)
    tl = build_timeline(1, 1, w, t, stride_noise=noise)
    assert tl.devices == 1
    assert [[(a.device, a.stage, a.t_step, a.latent_step, a.eps_steps) for a in r.actions]
            for r in tl.rounds] == [[(0, 0, k, k, (k,))] for k in range(t)]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 20), st.booleans())
def test_warmup_everything_is_sequential(n, s, t, shift):
    tl = build_timeline(n, s, t, t, time_shift=shift)
    assert [r.steps for r in tl.rounds] == [(k,) for k in range(t)]
    assert all(a.t_step == r.index and a.device == a.stage and (a.fresh or n == 1)
               for r in tl.rounds for a in r.actions)


def test_cooldown_by_hand():
    """N=3, S=2, W=1, T=6, C=2: one warm-up round, two parallel batches (the second cut
    short by the cool-down), two sequential cool-down rounds on fresh values."""
    tl = build_timeline(n=3, stride=2, warmup=1, steps=6, cooldown=2)
    assert [(r.kind, r.steps) for r in tl.rounds] == [
        ("warmup", (0,)), ("parallel", (1, 2)), ("parallel", (3,)), ("cooldown", (4,)),
        ("cooldown", (5,))]
    for r in tl.rounds[3:]:
        assert [(a.device, a.stage, a.t_step, a.inputs_round, a.eps_steps) for a in r.actions] \
            == [(s, s, r.steps[0], r.index, r.steps if s == 2 else ()) for s in range(3)]
    grid = format_grid(tl).splitlines()
    assert grid[0].endswith("cooldown=2") and grid[-1].startswith("r4 cool")


@pytest.mark.parametrize("mutation, message", [
    (dict(r=3, d=1, inputs_round=2), "fresh values"),   # a cool-down stage reading stale values
    (dict(r=4, d=2, eps_steps=()), "ε for steps"),      # a cool-down step without ε
])
def test_validate_catches_broken_cooldown_rules(mutation, message):
    tl = build_timeline(n=3, stride=2, warmup=1, steps=6, cooldown=2)
    r, d = mutation.pop("r"), mutation.pop("d")
    with pytest.raises(ValueError, match=message):
        validate(_replace_action(tl, r, d, **mutation))
    # a parallel batch reaching into the cool-down
    with pytest.raises(ValueError, match="covers steps"):
        validate(dataclasses.replace(build_timeline(n=3, stride=2, warmup=1, steps=6),
                                     cooldown=1))


def test_sync_steps_by_hand():
    """A sync step in the middle: a sequential round; the batch before it is cut short and
    the next parallel round reads the values the sync round published."""
    tl = build_timeline(n=2, stride=2, warmup=1, steps=7, sync=[3])
    assert [(r.kind, r.steps) for r in tl.rounds] == [
        ("warmup", (0,)), ("parallel", (1, 2)), ("sync", (3,)), ("parallel", (4, 5)),
        ("parallel", (6,))]
    assert all(a.inputs_round == 2 for a in tl.rounds[3].actions)
    assert all(a.fresh for a in tl.rounds[2].actions)
    broken = list(tl.rounds)
    broken[2] = dataclasses.replace(tl.rounds[2], kind="parallel")
    with pytest.raises(ValueError, match="covers steps"):
        validate(dataclasses.replace(tl, rounds=tuple(broken)))


@settings(max_examples=200, deadline=None)
@given(params, st.integers(0, 25), st.sets(st.integers(0, 25), max_size=6))
def test_cooldown_and_sync_invariants(p, c, sync):
    n, s, w, t, shift, noise = p
    s = min(s, 2) if noise == "official" else s
    c = min(c, t - w)
    last = t - c
    hold = noise == "official" and s == 2 and n > 1 and w % 2 == 0 and w < last
    aligned = noise == "official" and s == 2 and n > 1
    sync = {k for k in sync if w <= k < last and not (aligned and (k % 2 or (hold and k == w)))}
    tl = build_timeline(n, s, w, t, time_shift=shift, stride_noise=noise, cooldown=c,
                        sync=sync)
    validate(tl)
    assert [r.steps for r in tl.rounds if r.kind == "sync"] == [(k,) for k in sorted(sync)]
    assert all(not set(r.steps) & sync for r in tl.parallel_rounds)
    assert [r.steps for r in tl.rounds if r.kind == "cooldown"] == [(k,) for k in range(last, t)]
    assert all(k < last for r in tl.parallel_rounds for k in r.steps)
    if not sync:
        assert len(tl.parallel_rounds) == math.ceil(max(last - w - hold, 0) / s)
    assert sum(len(r.steps) for r in tl.rounds if r.sequential) == w + c + len(sync) + hold
    for r in tl.rounds:
        if r.kind in ("cooldown", "sync"):  # fresh, fed τ_k, unshifted, stages in order
            assert [(a.device, a.stage, a.t_step) for a in r.actions] == \
                [(d, d, r.steps[0]) for d in range(n)]
            assert all(a.fresh or n == 1 for a in r.actions)
    if w + c + len(sync) >= t - hold:
        assert all(r.sequential for r in tl.rounds)
