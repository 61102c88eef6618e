"""CUDA: stages moved to the GPU, and the nccl executor. Skipped without a GPU."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import STEPS, compiled, cond_and_noise, tiny

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.distributed.launch import launch
from asyncdiff.distributed.worker import SamplingJob
from asyncdiff.schedule import Schedule
from asyncdiff.emulate import Emulator
from asyncdiff.timeline import build_timeline
from partition.capture import move_graph
from schedulers import make_scheduler, sample

pytestmark = pytest.mark.gpu


def test_stages_on_gpu_chain_like_the_whole_model():
    _, inputs, graph = tiny()
    c = compiled(3)
    staged = copy.deepcopy(c.staged).to("cuda")
    env = {k: v.cuda() for k, v in graph.captured.env(inputs).items()}
    whole = move_graph(copy.deepcopy(graph.captured.gm), "cuda")
    want = whole(*(env[graph.captured.placeholders[s.name]] for s in graph.captured.specs))
    env = staged.prepare(env)
    for seg in staged.segments:
        env.update(seg(env))
    assert torch.equal(env[c.staged.output], want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs two GPUs")
@pytest.mark.timeout(300)
def test_nccl_equals_emulator_on_gpu():
    c = compiled(2)
    cond, x = cond_and_noise()
    staged = copy.deepcopy(c.staged).to("cuda")
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    emu = Emulator(staged, c.plan, build_timeline(2, 1, 1, STEPS), sched.timesteps)
    want = sample(PipelineDenoiser(emu), make_scheduler("ddim"), x.cuda(),
                  {k: v.cuda() for k, v in cond.items()}, steps=STEPS)
    got = launch(c.staged, c.plan, Schedule(n=2), [SamplingJob("ddim", STEPS, x, cond)],
                 backend="nccl")
    assert torch.equal(got.latents[0].cpu(), want.cpu())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,stride,warmup,noise", [(2, 1, 1, "fresh"), (3, 2, 2, "fresh"),
                                                   (3, 2, 2, "official")])
def test_each_ranks_loop_on_one_gpu_with_its_sends_lowered(n, stride, warmup, noise):
    """Short of two GPUs: every rank's loop on this GPU (threads, messages in memory under
    NCCL's matching rules) equals the emulator on the GPU; round times are CUDA events; no
    host synchronisation inside any parallel round."""
    from asyncdiff.distributed.local import run_local

    torch.backends.cudnn.deterministic = True
    c = compiled(n)
    cond, x = cond_and_noise()
    par = Schedule(n=n, stride=stride, warmup=warmup, stride_noise=noise)
    staged = copy.deepcopy(c.staged).to("cuda")
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    tl = build_timeline(n, stride, warmup, STEPS, stride_noise=noise)
    want = sample(PipelineDenoiser(Emulator(staged, c.plan, tl, sched.timesteps)),
                  make_scheduler("ddim"), x.cuda(), {k: v.cuda() for k, v in cond.items()},
                  steps=STEPS)
    got = run_local(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)],
                    device="cuda")
    assert got.latents[0].is_cuda and torch.equal(got.latents[0], want)
    assert got.syncs == {r: 0 for r in range(par.devices)}, got.syncs
    for stats in got.stats.values():
        assert all(0 <= s.start <= s.computed <= s.done for s in stats)
