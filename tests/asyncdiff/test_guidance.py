"""CFG-parallel and the hybrid (CFG-parallel × the pipeline): emulator and gloo executor.

The guidance batch [uncond, cond] of the tiny UNet's two example rows: each half is one row,
run on a plan captured for one row (``compiled(n, rows=1)``).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import STEPS, compiled, cond_and_noise, tiny
from test_emulator import timesteps

from asyncdiff.denoiser import PipelineDenoiser, SequentialDenoiser
from asyncdiff.distributed.launch import launch
from asyncdiff.distributed.worker import SamplingJob
from asyncdiff.schedule import Schedule
from asyncdiff.emulate import Emulator
from asyncdiff.guidance import GuidanceSplit, guidance_half
from asyncdiff.inputs import model_env
from asyncdiff.timeline import build_timeline
from schedulers import make_scheduler, sample

SCALE = 4.0


def guided_inputs():
    cond, x = cond_and_noise()
    return x[:1], {k: v[1:] for k, v in cond.items()}, {k: v[:1] for k, v in cond.items()}


def guided(denoiser, steps=STEPS):
    x, cond, uncond = guided_inputs()
    return sample(denoiser, make_scheduler("ddim"), x, cond, steps=steps,
                  guidance_scale=SCALE, uncond=uncond)


def pipeline(n, warmup, steps=STEPS, record=False, rows=1, stride=1):
    c = compiled(n, rows=rows)
    tl = build_timeline(n, stride, warmup, steps)
    return PipelineDenoiser(Emulator(c.staged, c.plan, tl, timesteps(steps), record=record))


def cfg_parallel():
    return GuidanceSplit([SequentialDenoiser(compiled(1, rows=1).staged)] * 2)


class Captured:
    """The whole captured network (not its stages) called on one guidance half at a time:
    the per-half sequential reference, built independently of the stages."""

    def __init__(self):
        _, self.inputs, self.graph = tiny(1)
        self.staged = compiled(1, rows=1).staged  # only to build the inputs as a stage does

    def __call__(self, x, t, step, cond):
        out = []
        for xh, ch in (guidance_half(x, cond, g) for g in (0, 1)):
            env = model_env(self.staged.specs, self.staged.placeholders, xh, t, ch)
            by_name = {s.name: env[self.staged.placeholders[s.name]] for s in self.staged.specs}
            out.append(self.graph.captured({k: by_name[k] for k in self.inputs}))
        return torch.cat(out)


def test_cfg_parallel_equals_the_per_half_sequential_reference():
    with torch.no_grad():
        assert torch.equal(guided(cfg_parallel()), guided(Captured()))


def test_guidance_half_rejects_an_odd_batch():
    with pytest.raises(ValueError, match="a batch of 3; allowed: an even batch"):
        guidance_half(torch.zeros(3, 1), {}, 0)


def test_hybrid_with_everything_warm_up_is_cfg_parallel():
    hybrid = GuidanceSplit([pipeline(2, STEPS), pipeline(2, STEPS)])
    assert torch.equal(guided(hybrid), guided(cfg_parallel()))


def test_hybrid_staleness_equals_the_plain_pipeline():
    """Each guidance group consumes exactly what the plain pipeline (one batch [u, c])
    consumes: the same stage, timestep, latent step and source round for every value, in
    every round. The numbers differ only as a one-row batch differs from a two-row one."""
    groups = [pipeline(2, 1, record=True), pipeline(2, 1, record=True)]
    hybrid = guided(GuidanceSplit(groups))
    plain = pipeline(2, 1, record=True, rows=2)
    batched = guided(plain)
    want = [dataclasses.astuple(r) for r in plain.executor.log]
    for g in groups:
        assert [dataclasses.astuple(r) for r in g.executor.log] == want
    assert not torch.equal(hybrid, guided(cfg_parallel()))  # stale: not the sequential one
    rel = float((hybrid - batched).norm() / batched.norm())
    assert rel < 1e-4, f"hybrid vs plain pipeline: relative {rel:.2e}"


def test_a_group_on_another_schedule_breaks_the_hybrid():
    good = guided(GuidanceSplit([pipeline(3, 1), pipeline(3, 1)]))
    assert not torch.equal(guided(GuidanceSplit([pipeline(3, 1), pipeline(3, 2)])), good)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,replicas", [pytest.param(1, 2, marks=pytest.mark.slow), (2, 1)])
def test_distributed_cfg_parallel_equals_the_emulator(n, replicas):
    """CFG-parallel (N = 1: two replicas of 2 ranks, each its own noise) and the hybrid
    (N = 2, 4 ranks) over gloo."""
    c = compiled(n, rows=1)
    x, cond, uncond = guided_inputs()
    noises = [x] + [torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
                    for _ in range(replicas - 1)]
    wants = []
    for xr in noises:
        den = cfg_parallel() if n == 1 else GuidanceSplit([pipeline(n, 1), pipeline(n, 1)])
        wants.append(sample(den, make_scheduler("ddim"), xr, cond, steps=STEPS,
                            guidance_scale=SCALE, uncond=uncond))
    par = Schedule(n=n, warmup=1, cfg_parallel=True, replicas=replicas)
    got = launch(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, xr, cond, guidance=SCALE,
                                                     uncond=uncond) for xr in noises])
    assert all(torch.equal(g, w) for g, w in zip(got.latents, wants))
    assert not torch.equal(got.latents[0], got.latents[-1]) or replicas == 1
    assert len(got.stats) == replicas * 2 * (n - 1 + 1)


@pytest.mark.timeout(120)
def test_distributed_cfg_parallel_without_guidance_is_refused():
    c = compiled(1, rows=1)
    x, cond, _ = guided_inputs()
    par = Schedule(n=1, cfg_parallel=True)
    with pytest.raises(Exception, match="cfg_parallel=true without guidance"):
        launch(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)])
