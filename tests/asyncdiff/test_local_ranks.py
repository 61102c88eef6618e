"""Every rank's loop in one process (threads, messages handed over in memory under NCCL's
matching rules): the executor interpreting its lowered program equals the emulator, bit for
bit, without processes; the same path runs each rank on one GPU in ``make gpu-check``."""
from __future__ import annotations

import pytest
import torch
from conftest import compiled, cond_and_noise, emulate

from asyncdiff.distributed.local import run_local
from asyncdiff.distributed.worker import ParallelSpec, SamplingJob

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
    par = ParallelSpec(n=n, stride=stride, warmup=warmup, stride_noise=noise, cooldown=cool,
                       sync=sync, time_shift=shift)
    got = run_local(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)])
    assert torch.equal(got.latents[0], emulate(c, par, x, cond, STEPS))
    assert sorted(got.stats) == list(range(par.devices))
    assert all(len(s) == len(got.stats[0]) for s in got.stats.values())


@pytest.mark.timeout(120)
def test_a_rank_that_fails_stops_the_others_and_is_named():
    c = compiled(3)
    cond, x = cond_and_noise()
    par = ParallelSpec(n=3, stride=1, warmup=1)
    bad = SamplingJob("ddim", STEPS, x, {"encoder_hidden_states": cond[
        "encoder_hidden_states"][:, :3]})  # the wrong shape: every rank's first round fails
    with pytest.raises(RuntimeError, match=r"rank \d failed: ValueError: input "
                                           r"'encoder_hidden_states' has shape"):
        run_local(c.staged, c.plan, par, [bad], timeout_s=20)
