"""The emulator against the sequential sampler and against hand-unrolled schedules."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import STEPS, compiled, cond_and_noise, tiny

from asyncdiff.denoiser import PipelineDenoiser, SequentialDenoiser
from asyncdiff.emulate import Emulator
from asyncdiff.inputs import model_env
from asyncdiff.timeline import build_timeline
from schedulers import make_scheduler, sample


def timesteps(steps: int = STEPS) -> list[float]:
    s = make_scheduler("ddim")
    s.set_timesteps(steps)
    return [float(t) for t in s.timesteps]


def run_emulator(n, stride, warmup, steps=STEPS, time_shift=False, noise="fresh", tl=None,
                 strategy="balanced", record=False, cooldown=0, sync=()):
    c = compiled(n, strategy)
    cond, x = cond_and_noise()
    tl = tl or build_timeline(n, stride, warmup, steps, time_shift, noise, cooldown, sync)
    emu = Emulator(c.staged, c.plan, tl, timesteps(steps), record=record)
    out = sample(PipelineDenoiser(emu), make_scheduler("ddim"), x, cond, steps=steps)
    return out, emu


def sequential(steps=STEPS):
    c = compiled(2)
    cond, x = cond_and_noise()
    return sample(SequentialDenoiser(c.staged), make_scheduler("ddim"), x, cond, steps=steps)


def test_model_is_sensitive():
    """Output depends on the timestep and the latent, and is far from zero."""
    bundle, inputs, graph = tiny()
    captured = graph.captured
    a = captured(inputs)
    b = captured({**inputs, "timestep": inputs["timestep"] + 250})
    c = captured({**inputs, "sample": inputs["sample"] + 0.1})
    assert a.abs().mean() > 1e-2
    assert (a - b).norm() / a.norm() > 1e-2
    assert (a - c).norm() / a.norm() > 1e-3


@pytest.mark.parametrize("n,stride", [(2, 1), (3, 2), (4, 3)])
def test_warmup_everything_is_sequential(n, stride):
    out, _ = run_emulator(n, stride, warmup=STEPS)
    assert torch.equal(out, sequential())


@pytest.mark.parametrize("n,stride,warmup,noise", [(2, 1, 1, "fresh"), (3, 2, 2, "fresh"),
                                                   (3, 2, 2, "official")])
def test_warmup_plus_cooldown_everything_is_sequential(n, stride, warmup, noise):
    """W + C = T: every round sequential, on fresh values (cool-down rounds run after nothing
    parallel), so the emulator is the sequential sampler bit for bit."""
    out, _ = run_emulator(n, stride, warmup, noise=noise, cooldown=STEPS - warmup)
    assert torch.equal(out, sequential())


def test_sync_steps_everywhere_between_warmup_and_cooldown_are_sequential():
    """Every step sequential by a per-step schedule (W = 1, sync 1 … T−2, C = 1)."""
    out, _ = run_emulator(3, 2, 1, cooldown=1, sync=tuple(range(1, STEPS - 1)))
    assert torch.equal(out, sequential())


def test_cooldown_recomputes_the_last_steps_fresh():
    """With a cool-down the last rounds read only fresh values (recorded reads name their own
    round), and the result differs from the run without it."""
    out, emu = run_emulator(3, 1, 1, cooldown=2, record=True)
    plain, _ = run_emulator(3, 1, 1)
    assert not torch.equal(out, plain) and not torch.equal(out, sequential())
    last = emu.timeline.rounds[-2:]
    for rec in emu.log:
        if rec.round in {r.index for r in last}:
            assert set(rec.value_rounds.values()) <= {rec.round}


def test_one_stage_is_sequential():
    out, _ = run_emulator(1, 1, warmup=0)
    assert torch.equal(out, sequential())


def test_async_differs_from_sequential():
    out, _ = run_emulator(2, 1, warmup=1)
    ref = sequential()
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.5  # stale, not broken


# --------------------------------------------------------------------------------------
# Hand-unrolled schedules (docs/design.md §2 executed by hand, no timeline involved)


class Hand:
    """Runs stages explicitly: ``stage(s, x, k, vals)`` feeds τ_k and the given values."""

    def __init__(self, n, steps):
        self.c = compiled(n)
        self.cond, self.x = cond_and_noise()
        self.tau = timesteps(steps)
        self.sched = make_scheduler("ddim")
        self.sched.set_timesteps(steps)

    def env(self, x, k):
        """The model inputs of step k and the hoisted conditioning (once-per-run values)."""
        st = self.c.staged
        return st.prepare(model_env(st.specs, st.placeholders, x, self.tau[k], self.cond))

    def full(self, x, k):
        """A warm-up step: every value fresh; returns (ε, all cross-stage values)."""
        env = self.env(x, k)
        for seg in self.c.staged.segments:
            env.update(seg(env))
        return env[self.c.staged.output], {v.name: env[v.name] for v in self.c.plan.values}

    def stage(self, s, x, k, vals):
        env = {**vals, **self.env(x, k)}
        for seg in self.c.staged.stage_segments(s):
            env.update(seg(env))
        produced = {name: env[name] for name in self.c.plan.stages[s].outputs}
        return env.get(self.c.staged.output), produced

    def update(self, x, eps, k):
        t = self.sched.timesteps[k]
        return self.sched.step(eps, t, x).prev_sample


def test_hand_worked_n2_s1_w1():
    """N=2, S=1, W=1, T=4 (Eq. 5): ε_k = E²(E¹(x_{k−1}, τ_{k−1}), τ_k) for k ≥ 1."""
    h = Hand(2, 4)
    with torch.no_grad():
        x0 = h.x
        eps0, v0 = h.full(x0, 0)                 # warm-up seeds E¹'s outputs
        x1 = h.update(x0, eps0, 0)
        _, v1 = h.stage(0, x1, 1, {})            # E¹ on fresh x1, τ1
        eps1, _ = h.stage(1, x1, 1, v0)          # E² on step-0 values, τ1
        x2 = h.update(x1, eps1, 1)
        _, v2 = h.stage(0, x2, 2, {})
        eps2, _ = h.stage(1, x2, 2, v1)
        x3 = h.update(x2, eps2, 2)
        _, _ = h.stage(0, x3, 3, {})
        eps3, _ = h.stage(1, x3, 3, v2)
        x4 = h.update(x3, eps3, 3)
    out, emu = run_emulator(2, 1, 1, steps=4, record=True)
    assert torch.equal(out, x4)
    # which round's values each stage consumed, which τ it was fed
    par = [(r.round, r.stage, r.t_fed, set(r.value_rounds.values())) for r in emu.log
           if r.round >= 1]
    tau = timesteps(4)
    assert par == [(1, 0, tau[1], set()), (1, 1, tau[1], {0}),
                   (2, 0, tau[2], set()), (2, 1, tau[2], {1}),
                   (3, 0, tau[3], set()), (3, 1, tau[3], {2})]


def test_hand_worked_n3_s2_w1():
    """N=3, S=2, W=1, T=6: batches (1,2), (3,4), (5); E¹,E² fed the batch's last τ, E³ copy j
    fed τ_{k+j}, all on the previous batch's values; E¹ on the batch's first latent."""
    h = Hand(3, 6)
    with torch.no_grad():
        x0 = h.x
        eps0, v0 = h.full(x0, 0)
        x1 = h.update(x0, eps0, 0)
        # batch (1, 2)
        _, a1 = h.stage(0, x1, 2, {})
        _, b1 = h.stage(1, x1, 2, v0)
        eps1, _ = h.stage(2, x1, 1, v0)
        eps2, _ = h.stage(2, x1, 2, v0)
        x2 = h.update(x1, eps1, 1)
        x3 = h.update(x2, eps2, 2)
        v1 = {**a1, **b1}
        # batch (3, 4)
        _, a2 = h.stage(0, x3, 4, {})
        _, b2 = h.stage(1, x3, 4, v1)
        eps3, _ = h.stage(2, x3, 3, v1)
        eps4, _ = h.stage(2, x3, 4, v1)
        x4 = h.update(x3, eps3, 3)
        x5 = h.update(x4, eps4, 4)
        v2 = {**a2, **b2}
        # batch (5): shorter
        eps5, _ = h.stage(2, x5, 5, v2)
        x6 = h.update(x5, eps5, 5)
    out, emu = run_emulator(3, 2, 1, steps=6, record=True)
    assert torch.equal(out, x6)
    tau = timesteps(6)
    fed = [(r.round, r.device, r.stage, r.t_fed, r.latent_step) for r in emu.log if r.round >= 1]
    assert fed == [(1, 0, 0, tau[2], 1), (1, 1, 1, tau[2], 1), (1, 2, 2, tau[1], 1),
                   (1, 3, 2, tau[2], 1), (2, 0, 0, tau[4], 3), (2, 1, 1, tau[4], 3),
                   (2, 2, 2, tau[3], 3), (2, 3, 2, tau[4], 3), (3, 0, 0, tau[5], 5),
                   (3, 1, 1, tau[5], 5), (3, 2, 2, tau[5], 5)]


def test_hand_worked_time_shift():
    """Time shift: after warm-up the network is fed τ_{k−1}; the scheduler still uses τ_k."""
    h = Hand(2, 3)
    with torch.no_grad():
        x0 = h.x
        eps0, v0 = h.full(x0, 0)
        x1 = h.update(x0, eps0, 0)
        _, v1 = h.stage(0, x1, 0, {})
        eps1, _ = h.stage(1, x1, 0, v0)
        x2 = h.update(x1, eps1, 1)
        _, _ = h.stage(0, x2, 1, {})
        eps2, _ = h.stage(1, x2, 1, v1)
        x3 = h.update(x2, eps2, 2)
    out, _ = run_emulator(2, 1, 1, steps=3, time_shift=True)
    assert torch.equal(out, x3)


def test_reuse_uses_copy0_for_the_whole_batch():
    """stride_noise=reuse (official code at S=2): ε_{k+1} = ε_k, N devices."""
    h = Hand(2, 3)
    with torch.no_grad():
        x0 = h.x
        eps0, v0 = h.full(x0, 0)
        x1 = h.update(x0, eps0, 0)
        eps1, _ = h.stage(1, x1, 1, v0)   # copy 0 fed τ_1 …
        x2 = h.update(x1, eps1, 1)
        x3 = h.update(x2, eps1, 2)         # … and its ε reused for step 2
    out, _ = run_emulator(2, 2, 1, steps=3, noise="reuse")
    assert torch.equal(out, x3)


def test_official_even_warmup_re_emits_the_last_warmup_eps():
    """stride_noise=official, W = 2 (docs/design.md §2): step 2 is load-only (ε_2 = ε_1),
    the first batch starts at k = 3 on the values of warm-up step 1; E² copy 0 fed τ_3, its ε
    used for steps 3 and 4."""
    h = Hand(2, 5)
    with torch.no_grad():
        x0 = h.x
        eps0, _ = h.full(x0, 0)
        x1 = h.update(x0, eps0, 0)
        eps1, v1 = h.full(x1, 1)
        x2 = h.update(x1, eps1, 1)
        x3 = h.update(x2, eps1, 2)         # load-only: nothing runs
        eps3, _ = h.stage(1, x3, 3, v1)
        x4 = h.update(x3, eps3, 3)
        x5 = h.update(x4, eps3, 4)
    out, _ = run_emulator(2, 2, 2, steps=5, noise="official")
    assert torch.equal(out, x5)
    reuse, _ = run_emulator(2, 2, 2, steps=5, noise="reuse")
    assert not torch.equal(reuse, x5)   # reuse groups from W: another schedule


# --------------------------------------------------------------------------------------
# Sensitivity: change one staleness rule and the hand-worked equivalence must fail


def _mutate(tl, fn):
    rounds = tuple(dataclasses.replace(r, actions=tuple(fn(r, a) for a in r.actions))
                   for r in tl.rounds)
    return dataclasses.replace(tl, rounds=rounds)


@pytest.mark.parametrize("mutation", ["copies_fed_last_timestep", "fresh_values",
                                      "first_stage_fed_first_timestep"])
def test_changed_rule_breaks_equivalence(mutation):
    """The hand-worked N=3, S=2 result is reproduced by the right timeline only."""
    good = build_timeline(3, 2, 1, 6)
    if mutation == "copies_fed_last_timestep":   # every E³ copy fed the batch's last τ
        tl = _mutate(good, lambda r, a: dataclasses.replace(a, t_step=r.steps[-1])
                     if not r.sequential else a)
    elif mutation == "fresh_values":             # parallel runs read this round's values
        tl = _mutate(good, lambda r, a: dataclasses.replace(a, inputs_round=r.index)
                     if not r.sequential else a)
    else:                                        # E¹, E² fed the batch's first τ
        tl = _mutate(good, lambda r, a: dataclasses.replace(a, t_step=r.steps[0])
                     if not r.sequential and a.stage < 2 else a)
    assert tl != good
    ref, _ = run_emulator(3, 2, 1, steps=6)
    out, _ = run_emulator(3, 2, 1, steps=6, tl=tl)
    assert not torch.equal(out, ref)
