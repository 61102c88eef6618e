"""CFG-parallel and the hybrid through the drop-in: ``parallelize(pipe, cfg_parallel=True)``.

Each half of the pipeline's guidance batch is its own stream (its own pipeline, its own stale
state); emulated, both run in this process; distributed, each on its own group of ranks.
"""
from __future__ import annotations

import pytest
import torch

import asyncdiff
from asyncdiff.denoiser import PipelineDenoiser, SequentialDenoiser
from asyncdiff.emulate import Emulator
from asyncdiff.guidance import GuidanceSplit
from asyncdiff.timeline import build_timeline
from schedulers import sample


import test_parallelize as tp  # noqa: E402

NAME = "sd15"


def halves_reference(handle, make) -> torch.Tensor:
    """``schedulers.sample`` with each guidance half its own denoiser (``make(staged, plan,
    timesteps)``) on the handle's one-half plan: what CFG-parallel must equal."""
    fam = tp.FAMILIES[NAME]
    pipe, _ = tp.pipeline(NAME)
    (session,) = handle.sessions.values()
    tau = fam.fresh_scheduler(pipe)
    tau.set_timesteps(tp.STEPS)
    split = GuidanceSplit([make(session, tau.timesteps) for _ in range(2)])

    def denoiser(x, t, k, cond):
        return fam.eps(split(x, t, k, cond))

    e = fam.inputs
    return sample(denoiser, fam.fresh_scheduler(pipe), e["latents"], fam.cond(e, False),
                  steps=tp.STEPS, guidance_scale=tp.GUIDANCE, uncond=fam.cond(e, True))


@pytest.mark.slow
def test_cfg_parallel_and_hybrid_through_the_dropin():
    fam = tp.FAMILIES[NAME]
    pipe, plain = tp.pipeline(NAME)
    handle = asyncdiff.parallelize(pipe, n=1, cfg_parallel=True)
    cfgp = fam.run(pipe)
    assert sorted(handle.streams) == [("unet", 0, 0), ("unet", 0, 1)]
    (session,) = handle.sessions.values()
    assert session.plan.n == 1
    want = halves_reference(handle, lambda s, taus: SequentialDenoiser(s.staged))
    assert torch.equal(cfgp, want)
    handle.detach()
    assert torch.equal(fam.run(pipe), plain)

    handle = asyncdiff.parallelize(pipe, n=2, warmup=1, cfg_parallel=True)
    hybrid = fam.run(pipe)
    want = halves_reference(handle, lambda s, taus: PipelineDenoiser(Emulator(
        s.staged, s.plan, build_timeline(2, 1, 1, tp.STEPS), taus)))
    assert torch.equal(hybrid, want)
    assert not torch.equal(hybrid, cfgp)  # stale: not CFG-parallel's result
    handle.set_timeline(warmup=tp.STEPS)  # every step warm: CFG-parallel again
    assert torch.equal(fam.run(pipe), cfgp)
    handle.detach()


def test_cfg_parallel_needs_an_even_batch():
    fam = tp.FAMILIES[NAME]
    pipe, _ = tp.pipeline(NAME)
    kw = fam.kwargs(fam.inputs)
    with asyncdiff.parallelize(pipe, n=1, cfg_parallel=True):
        with pytest.raises(ValueError, match="a batch of 1; allowed: an even batch"):
            pipe(**kw, latents=fam.inputs["latents"].clone(), num_inference_steps=2,
                 guidance_scale=1.0, height=tp.PIXELS, width=tp.PIXELS, output_type="latent")
    with pytest.raises(ValueError, match="cfg_parallel='yes'; allowed: True, False"):
        asyncdiff.parallelize(pipe, n=1, cfg_parallel="yes")


SCRIPT = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
dist.init_process_group("gloo")
import asyncdiff
import test_parallelize as tp

pipe, _ = tp.pipeline("sd15")
handle = asyncdiff.parallelize(pipe, n=1, cfg_parallel=True, mode="distributed")
out = tp.FAMILIES["sd15"].run(pipe)
handle.detach()
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, out)
if dist.get_rank() == 0:
    torch.save(gathered, {result!r})
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_cfg_parallel_equals_the_emulated_dropin(tmp_path):
    """Two ranks, one guidance half each, ε halves swapped every step."""
    ranks = tp.torchrun(SCRIPT, tmp_path)
    pipe, _ = tp.pipeline(NAME)
    with asyncdiff.parallelize(pipe, n=1, cfg_parallel=True):
        want = tp.FAMILIES[NAME].run(pipe)
    for r, got in enumerate(ranks):
        assert torch.equal(got, want), r
