"""Distributed executor == emulator, bit-exact (docs/design.md §2 invariant 3), and faults.

Every launch runs real worker processes over gloo on 127.0.0.1 with one thread each.
The matrix covers each N ∈ {2,3,4}, each S ∈ {1,2,3}, several W, time shift on and off,
both stride-noise modes, a non-contiguous (shell/core) plan and two replicas.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import compiled, cond_and_noise
from conftest import emulate as emulate_steps

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.distributed.launch import Run, WorkerError, launch, launch_all
from asyncdiff.distributed.worker import SamplingJob
from asyncdiff.distributed.limits import Limits
from asyncdiff.schedule import Schedule
from asyncdiff.emulate import Emulator
from asyncdiff.timeline import build_timeline
from schedulers import make_scheduler, sample

STEPS = 5


def emulate(c, par: Schedule, x, cond):
    return emulate_steps(c, par, x, cond, STEPS)


MATRIX = [
    # n, stride, warmup, time_shift, stride_noise, strategy
    (2, 1, 1, False, "fresh", "balanced"),
    (2, 1, 2, True, "fresh", "balanced"),
    (3, 1, 1, True, "fresh", "balanced"),
    (4, 1, 2, False, "fresh", "balanced"),
    (2, 2, 1, False, "fresh", "balanced"),
    (3, 2, 2, True, "fresh", "balanced"),
    (2, 3, 1, True, "fresh", "balanced"),
    (3, 2, 1, False, "reuse", "balanced"),
    (3, 2, 2, False, "official", "balanced"),
    (2, 2, 1, False, "fresh", "shell_core"),
]


def _by_world(matrix) -> dict[int, list]:
    out: dict[int, list] = {}
    for case in matrix:
        n, stride, warmup, shift, noise, _ = case
        world = Schedule(n=n, stride=stride, warmup=warmup, stride_noise=noise).world_size()
        out.setdefault(world, []).append(case)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_equals_emulator(world):
    """The matrix's cases of one world size run on one set of workers, spawned once
    (``launch_all``), each its own plan and schedule."""
    cases = _by_world(MATRIX)[world]
    cond, x = cond_and_noise()
    runs, wants = [], []
    for n, stride, warmup, shift, noise, strategy in cases:
        c = compiled(n, strategy)
        par = Schedule(n=n, stride=stride, warmup=warmup, time_shift=shift, stride_noise=noise)
        wants.append(emulate(c, par, x, cond))
        runs.append(Run(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)]))
    got = launch_all(runs)
    assert [torch.equal(g.latents[0], w) for g, w in zip(got, wants)] == [True] * len(cases)
    assert all(len(g.stats) == world for g in got)


def test_the_matrix_covers_every_world_size_it_is_grouped_by():
    assert sorted(_by_world(MATRIX)) == [2, 3, 4] and sum(map(len, _by_world(MATRIX).values())) \
        == len(MATRIX)


@pytest.mark.timeout(300)
def test_distributed_equals_emulator_with_sync_and_cooldown():
    """Parallel rounds around a sync round, then a cool-down round (the stride copies idle
    in sequential rounds, and are handed the values they read next)."""
    c = compiled(3)
    cond, x = cond_and_noise()
    par = Schedule(n=3, stride=2, warmup=1, cooldown=1, sync=(3,))
    want = emulate(c, par, x, cond)
    got = launch(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)])
    assert torch.equal(got.latents[0], want)


@pytest.mark.timeout(300)
def test_replicas_run_independent_pipelines():
    c = compiled(2)
    jobs, wants = [], []
    par = Schedule(n=2, stride=1, warmup=1, replicas=2)
    for seed in (1, 2):
        cond, x = cond_and_noise(seed)
        jobs.append(SamplingJob("ddim", STEPS, x, cond))
        wants.append(emulate(c, par, x, cond))
    got = launch(c.staged, c.plan, par, jobs)
    assert not torch.equal(wants[0], wants[1])
    assert all(torch.equal(g, w) for g, w in zip(got.latents, wants))


def _gone(pids) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["raise", "kill", pytest.param("hang", marks=pytest.mark.slow)])
def test_failed_worker_stops_everyone(kind):
    c = compiled(3)
    cond, x = cond_and_noise()
    par = Schedule(n=3)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank \d") as err:
        launch(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)],
               limits=Limits(step_s=10),
               fault={"rank": 1, "at": 2, "kind": kind})
    assert time.monotonic() - t0 < 30 + 10  # the bound, plus process start-up
    # a raise or a death is named by the parent; the hung rank by whoever waited on it
    assert "rank 1" in str(err.value)
    assert _gone(err.value.pids)


@pytest.mark.timeout(120)
def test_plan_hash_mismatch_is_an_error():
    c2, c3 = compiled(2), compiled(3)
    cond, x = cond_and_noise()
    with pytest.raises(WorkerError, match="plan hash mismatch"):
        launch(c2.staged, c2.plan, Schedule(n=2), [SamplingJob("ddim", STEPS, x, cond)],
               plans={1: c3.plan})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheduler", ["dpmsolver++", "euler"])
def test_guidance_and_other_schedulers(scheduler):
    """Classifier-free guidance (one batched call per step) with multistep/σ schedulers."""
    c = compiled(2)
    cond2, x2 = cond_and_noise()
    ehs = cond2["encoder_hidden_states"]
    cond, uncond = {"encoder_hidden_states": ehs[1:]}, {"encoder_hidden_states": ehs[:1]}
    x = x2[:1]
    par = Schedule(n=2, stride=2, warmup=1)
    sched = make_scheduler(scheduler)
    sched.set_timesteps(STEPS)
    tl = build_timeline(2, 2, 1, STEPS)
    emu = Emulator(c.staged, c.plan, tl, sched.timesteps)
    want = sample(PipelineDenoiser(emu), make_scheduler(scheduler), x, cond, steps=STEPS,
                  guidance_scale=3.0, uncond=uncond)
    job = SamplingJob(scheduler, STEPS, x, cond, guidance=3.0, uncond=uncond)
    got = launch(c.staged, c.plan, par, [job])
    assert torch.equal(got.latents[0], want)


@pytest.mark.timeout(300)
def test_learned_sigma_model_with_a_narrowed_prediction():
    """DiT's contract narrows [ε, σ] to ε: a non-contiguous tensor must still be sendable."""
    from experiments import zoo
    from partition import PartitionRequest, compile_model
    bundle = zoo.build(zoo.load_yaml("dit"), seed=0)
    inputs = bundle.inputs(0)
    c = compile_model(bundle.module, bundle.specs, inputs, PartitionRequest(n=2),
                      contract=bundle.contract)
    cond = {s.name: inputs[s.name] for s in bundle.specs if s.role == "cond"}
    x = torch.randn(inputs[bundle.latent].shape, generator=torch.Generator().manual_seed(3))
    par = Schedule(n=2, stride=1, warmup=1)
    want = emulate(c, par, x, cond)
    got = launch(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)])
    assert torch.equal(got.latents[0], want)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_end_to_end(dtype):
    """A model in fp16 / bf16: its stages are exact, the values it sends and the plan's byte
    counts are in that dtype (half of fp32's), and distributed == emulator."""
    from experiments import zoo
    from partition import PartitionRequest, compile_model

    bundle = zoo.build(zoo.load_yaml("sd15"), seed=0)
    name = str(dtype).removeprefix("torch.")
    specs = tuple(type(s)(**{**s.to_dict(), "dtype": name}) if s.role != "timestep" else s
                  for s in bundle.specs)
    inputs = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v
              for k, v in bundle.inputs(0).items()}
    c = compile_model(bundle.module.to(dtype), specs, inputs, PartitionRequest(n=2),
                      cost_model="flops", name="sd15/tiny", config_hash="")
    full = compiled(2)
    assert c.plan.verification.startswith("exact")
    assert {v.dtype for v in c.plan.values} == {name} and c.plan.output_dtype == name
    assert 2 * c.plan.bytes_per_step == full.plan.bytes_per_step
    cond = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
    _, x = cond_and_noise()
    par = Schedule(n=2)
    want = emulate(c, par, x.to(dtype), cond)
    got = launch(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x.to(dtype), cond)])
    assert got.latents[0].dtype == dtype and torch.equal(got.latents[0], want)


# --------------------------------------------------------------------------- what is posted
RECORDED = [
    # n, stride, warmup, noise, cooldown, sync, cfg_parallel, replicas
    (2, 1, 1, "fresh", 0, (), False, 1),
    pytest.param(3, 2, 2, "fresh", 1, (3,), False, 1, marks=pytest.mark.slow),
    pytest.param(3, 2, 2, "official", 0, (), False, 1, marks=pytest.mark.slow),
    pytest.param(2, 1, 1, "fresh", 0, (), True, 1, marks=pytest.mark.slow),  # the hybrid
    pytest.param(2, 1, 1, "fresh", 0, (), False, 2, marks=pytest.mark.slow),  # two replicas
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,stride,warmup,noise,cool,sync,cfg,replicas", RECORDED)
def test_recorded_calls_equal_the_lowered_program_and_replay_under_nccl_rules(
        tmp_path, n, stride, warmup, noise, cool, sync, cfg, replicas):
    """Every point-to-point call each rank makes, recorded where it reaches
    torch.distributed, equals its lowered program call for call (so the NCCL-rules replay of
    the lowering checks what actually runs), replays to completion itself, and the result
    equals the emulator."""
    from asyncdiff.distributed import trace
    from asyncdiff.lowering import lower, replay

    c = compiled(n, rows=1 if cfg else 2)
    cond, x = cond_and_noise()
    guided = {}
    if cfg:  # one row, the sampler's guidance batch [uncond, cond] is split in halves
        ehs = cond["encoder_hidden_states"]
        x, cond = x[:1], {"encoder_hidden_states": ehs[1:]}
        guided = {"guidance": 3.0, "uncond": {"encoder_hidden_states": ehs[:1]}}
    par = Schedule(n=n, stride=stride, warmup=warmup, stride_noise=noise, cooldown=cool,
                       sync=sync, cfg_parallel=cfg, replicas=replicas)
    jobs = [SamplingJob("ddim", STEPS, x, cond, **guided)] * replicas
    got = launch(c.staged, c.plan, par, jobs, trace_dir=str(tmp_path))
    recorded = trace.load(tmp_path)
    tl = build_timeline(n, stride, warmup, STEPS, stride_noise=noise, cooldown=cool, sync=sync)
    lowered = lower(tl, c.plan, groups=par.groups, replicas=replicas)
    assert sorted(recorded) == list(range(par.world_size()))
    for rank, calls in recorded.items():
        assert calls == trace.lowered_calls(lowered.program(rank)), rank
        assert all(len(g) >= 1 for g in calls)
    replay({r: trace.as_groups(calls) for r, calls in recorded.items()})
    if not cfg:
        assert torch.equal(got.latents[0], emulate(c, par, x, cond))
        # the bytes each rank sent are the emulator's count, read from the same lowering
        emu = _emulator(c, par)
        sample(PipelineDenoiser(emu), make_scheduler("ddim"), x, cond, steps=STEPS)
        per = par.devices
        sent = {r: sum(s.bytes_sent for s in got.stats[r]) for r in range(per)}
        assert sent == dict(enumerate(emu.bytes_sent))


def _emulator(c, par):
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    tl = par.timeline(STEPS)
    return Emulator(c.staged, c.plan, tl, sched.timesteps)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hoisted_values_sent_from_their_home_stage(tmp_path):
    """A caption projection heavier than the blocks is computed once per run on one stage and
    sent to the others (the ``hoist`` group, before round 0): distributed == emulator, and
    the hoist group is what each rank posts first."""
    import denoisers as D

    from asyncdiff.distributed import trace
    from partition import PartitionRequest, compile_model

    torch.manual_seed(0)
    model, specs = D.CaptionDiT().eval(), D.CAPTION_SPECS
    inputs = D.example(specs)
    c = compile_model(model, specs, inputs, PartitionRequest(n=3, depth=None))
    sent = [h for h in c.plan.hoisted if h.home >= 0]
    assert sent
    cond = {"context": inputs["context"]}
    x = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(5))
    par = Schedule(n=3, stride=2, warmup=1)
    got = launch(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)],
                 trace_dir=str(tmp_path))
    assert torch.equal(got.latents[0], emulate(c, par, x, cond))
    first = {r: calls[0] for r, calls in trace.load(tmp_path).items()}
    home = sent[0].home
    assert {op for op, *_ in first[home]} == {"send"}
    assert all(("recv", home) == g[0][:2] for r, g in first.items() if r != home)
