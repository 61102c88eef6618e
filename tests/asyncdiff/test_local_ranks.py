"""Every rank's loop in one process (threads, messages handed over in memory under NCCL's
matching rules): the executor interpreting its lowered program equals the emulator, bit for
bit, without processes; the same path runs each rank on one GPU in ``make gpu-check``."""
from __future__ import annotations

import pytest
import torch
from conftest import compiled, cond_and_noise, emulate

from asyncdiff.distributed.local import run_local
from asyncdiff.distributed.worker import SamplingJob
from asyncdiff.schedule import Schedule

STEPS = 6

CASES = [
    # n, stride, warmup, noise, cooldown, sync, time_shift
    (2, 1, 1, "fresh", 0, (), False),
    (3, 2, 2, "fresh", 1, (4,), True),
    (4, 1, 2, "reuse", 0, (), False),
    (3, 2, 2, "official", 0, (), False),
    (2, 3, 1, "fresh", 0, (), False),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n,stride,warmup,noise,cool,sync,shift", CASES)
def test_every_rank_in_one_process_equals_the_emulator(n, stride, warmup, noise, cool, sync,
                                                        shift):
    c = compiled(n)
    cond, x = cond_and_noise()
    par = Schedule(n=n, stride=stride, warmup=warmup, stride_noise=noise, cooldown=cool,
                       sync=sync, time_shift=shift)
    got = run_local(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)])
    assert torch.equal(got.latents[0], emulate(c, par, x, cond, STEPS))
    assert sorted(got.stats) == list(range(par.devices))
    assert all(len(s) == len(got.stats[0]) for s in got.stats.values())


@pytest.mark.timeout(120)
def test_a_shell_core_split_with_two_replicas_equals_the_emulator():
    """The last stage feeds another stage (shell/core); two replicas, each its own noise."""
    c = compiled(3, "shell_core")
    cond, x = cond_and_noise()
    _, x2 = cond_and_noise(7)
    par = Schedule(n=3, stride=2, warmup=1, replicas=2)
    got = run_local(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, xr, cond)
                                            for xr in (x, x2)])
    assert [torch.equal(g, emulate(c, par, xr, cond, STEPS))
            for g, xr in zip(got.latents, (x, x2))] == [True, True]
    assert not torch.equal(got.latents[0], got.latents[1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 2])
def test_cfg_parallel_and_the_hybrid_equal_the_emulated_halves(n):
    from asyncdiff.denoiser import PipelineDenoiser, SequentialDenoiser
    from asyncdiff.emulate import Emulator
    from asyncdiff.guidance import GuidanceSplit
    from asyncdiff.timeline import build_timeline
    from schedulers import make_scheduler, sample

    c = compiled(n, rows=1)
    cond2, x2 = cond_and_noise()
    ehs = cond2["encoder_hidden_states"]
    x, cond, uncond = x2[:1], {"encoder_hidden_states": ehs[1:]}, \
        {"encoder_hidden_states": ehs[:1]}
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    halves = [SequentialDenoiser(compiled(1, rows=1).staged) if n == 1 else PipelineDenoiser(
        Emulator(c.staged, c.plan, build_timeline(n, 1, 1, STEPS), sched.timesteps))
        for _ in (0, 1)]
    want = sample(GuidanceSplit(halves), make_scheduler("ddim"), x, cond, steps=STEPS,
                  guidance_scale=3.0, uncond=uncond)
    par = Schedule(n=n, warmup=1, cfg_parallel=True)
    got = run_local(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond, guidance=3.0,
                                                        uncond=uncond)])
    assert torch.equal(got.latents[0], want)


@pytest.mark.timeout(120)
def test_hoisted_values_sent_from_their_home_equal_the_emulator():
    import denoisers as D

    from partition import PartitionRequest, compile_model

    torch.manual_seed(0)
    model, specs = D.CaptionDiT().eval(), D.CAPTION_SPECS
    inputs = D.example(specs)
    c = compile_model(model, specs, inputs, PartitionRequest(n=3, depth=None))
    assert any(h.home >= 0 for h in c.plan.hoisted)
    cond = {"context": inputs["context"]}
    x = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(5))
    for par in (Schedule(n=3, stride=2, warmup=1), Schedule(n=3, stride=3, warmup=2)):
        got = run_local(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)])
        assert torch.equal(got.latents[0], emulate(c, par, x, cond, STEPS))


@pytest.mark.timeout(120)
def test_a_rank_that_fails_stops_the_others_and_is_named():
    """Rank 1 alone fails (an injected error at round 2); the others, waiting on it, stop, and
    the failure reported is rank 1's own, not a peer's view of it."""
    c = compiled(3)
    cond, x = cond_and_noise()
    job = SamplingJob("ddim", STEPS, x, cond)
    par = Schedule(n=3, stride=1, warmup=1)
    with pytest.raises(RuntimeError, match=r"^rank 1 failed: RuntimeError: injected fault at 2"):
        run_local(c.staged, c.plan, par, [job], timeout_s=20, fault={"rank": 1, "at": 2})
