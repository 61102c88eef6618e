"""The step cache (DeepCache-style, one device) on the timeline and the emulator."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import STEPS, compiled, cond_and_noise
from test_emulator import sequential, timesteps

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.emulate import Emulator
from asyncdiff.inputs import model_env
from asyncdiff.step_cache import build_cache_timeline, validate
from schedulers import make_scheduler, sample


def run_cache(n, interval, steps=STEPS, tl=None):
    c = compiled(n, "shell_core")
    cond, x = cond_and_noise()
    tl = tl or build_cache_timeline(n, interval, steps)
    emu = Emulator(c.staged, c.plan, tl, timesteps(steps))
    return sample(PipelineDenoiser(emu), make_scheduler("ddim"), x, cond, steps=steps)


def test_interval_one_is_sequential():
    assert torch.equal(run_cache(2, 1), sequential())


def test_shell_stage_holds_the_outer_blocks():
    """Stage N−1 of the shell split holds the trunk's first and last nodes (a prefix and a
    suffix): a cached step runs the network's outer blocks, fresh, and emits ε."""
    c = compiled(2, "shell_core")
    first, last = c.plan.stages
    prefix, suffix = last.segments
    assert prefix.start == 0 and suffix.stop == max(s.stop for s in first.segments + last.segments)
    assert prefix.stop <= min(s.start for s in first.segments) and \
        suffix.start >= max(s.stop for s in first.segments)


def test_hand_worked_interval_2():
    """Unrolled by hand: even steps run the whole network, odd steps only stage N−1 on the
    values of stage 0 from the step before."""
    c = compiled(2, "shell_core")
    cond, x = cond_and_noise()
    ts = timesteps()
    cross = [v.name for v in c.plan.values]
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    held = {}
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            env = c.staged.prepare(model_env(c.staged.specs, c.staged.placeholders,
                                             sched.scale_model_input(x, t), ts[k], cond))
            if k % 2 == 0:
                for seg in c.staged.segments:
                    env.update(seg(env))
                held = {name: env[name] for name in cross}
            else:
                env = {**held, **env}
                for seg in c.staged.stage_segments(1):
                    env.update(seg(env))
            x = sched.step(env[c.staged.output], t, x).prev_sample
    got = run_cache(2, 2)
    assert torch.equal(got, x)
    assert not torch.equal(got, sequential())


def _mutate(tl, fn):
    rounds = tuple(dataclasses.replace(r, actions=tuple(fn(r, a) for a in r.actions))
                   for r in tl.rounds)
    return dataclasses.replace(tl, rounds=rounds)


@pytest.mark.parametrize("mutation", ["fed_the_full_steps_timestep", "reads_the_round_before"])
def test_changed_rule_breaks_equivalence_and_the_validator(mutation):
    good = build_cache_timeline(2, 3, STEPS)
    if mutation == "fed_the_full_steps_timestep":
        tl = _mutate(good, lambda r, a: dataclasses.replace(a, t_step=r.index - r.index % 3)
                     if r.kind == "cached" else a)
    else:  # a cached round reading the round before: a cached one publishes nothing
        tl = _mutate(good, lambda r, a: dataclasses.replace(a, inputs_round=r.index - 1)
                     if r.kind == "cached" else a)
    with pytest.raises(ValueError, match="step-cache timeline round"):
        validate(tl)
    if mutation == "fed_the_full_steps_timestep":
        assert not torch.equal(run_cache(2, 3, tl=tl), run_cache(2, 3))


def test_longer_intervals_move_further_from_sequential():
    ref = sequential()
    err = [float((run_cache(3, k) - ref).norm()) for k in (2, 3)]
    assert 0 < err[0] < err[1]


@pytest.mark.parametrize("args,match", [((1, 2, 6), "n=1"), ((2, 0, 6), "cache_interval=0"),
                                        ((2, 7, 6), "cache_interval=7")])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_cache_timeline(*args)


def test_every_cache_timeline_validates_and_counts_its_full_steps():
    for n in (2, 3, 4):
        for steps in range(1, 8):
            for k in range(1, steps + 1):
                tl = build_cache_timeline(n, k, steps)
                full = [r for r in tl.rounds if r.sequential]
                assert [r.steps[0] for r in full] == list(range(0, steps, k))
                assert all(len(r.actions) == 1 for r in tl.rounds if not r.sequential)
                assert tl.devices == 1 and "cache_interval" in str(tl)
