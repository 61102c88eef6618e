"""What one worker process does: join the group, agree on the plan, sample, report.

Used by the self-spawning launcher (``asyncdiff/distributed/launch.py``) and, under ``torchrun``,
by an entry point that builds the job itself (ranks and the rendezvous come from env://).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.distributed import trace
from asyncdiff.distributed.executor import DistributedExecutor
from asyncdiff.distributed.transport import TorchTransport
from asyncdiff.guidance import GuidanceHalf
from asyncdiff.lowering import check, lower
from asyncdiff.timeline import build_timeline, devices_needed
from partition.plan import Plan
from partition.threads import intra_op_threads
from partition.stages import Segment
from schedulers import make_scheduler, sample


@dataclass
class SamplingJob:
    """The sampling problem every pipeline solves (one per replica: own x_T and cond)."""

    scheduler: str
    steps: int
    x_T: torch.Tensor
    cond: dict
    guidance: float | None = None
    uncond: dict | None = None
    scheduler_kwargs: dict = field(default_factory=dict)


@dataclass
class ParallelSpec:
    n: int
    stride: int = 1
    warmup: int = 1
    time_shift: bool = False
    stride_noise: str = "fresh"
    cooldown: int = 0
    sync: tuple[int, ...] = ()
    threads: int = 1
    backend: str = "gloo"
    replicas: int = 1
    cfg_parallel: bool = False    # the two guidance halves on two groups (asyncdiff/guidance.py)
    timeout_s: float = 30.0       # the longest wait for a peer (asyncdiff/distributed/limits.py)
    run_timeout_s: float = 600.0  # the whole run, start-up included

    @property
    def devices(self) -> int:
        """Devices of one pipeline (one guidance group): N−1+S, or N."""
        return devices_needed(self.n, self.stride, self.stride_noise)

    @property
    def groups(self) -> int:
        """Guidance groups per replica: 2 with CFG-parallel (uncond, cond), else 1."""
        return 2 if self.cfg_parallel else 1

    @property
    def world(self) -> int:
        """Ranks: replicas × groups × devices; rank = (replica·groups + group)·devices + d."""
        return self.replicas * self.groups * self.devices


@dataclass
class WorkerJob:
    """Everything rank ``rank`` needs; its ``segments`` are its own stage's only."""

    plan: Plan
    segments: list[Segment]
    specs: tuple
    placeholders: dict
    output: str
    parallel: ParallelSpec
    sampling: list[SamplingJob]  # one per replica
    hoist_inputs: tuple[str, ...] = ()  # model inputs every stage's prologues read
    fault: dict | None = None    # tests: {"rank": r, "round": i, "kind": "raise"|"kill"|"hang"}
    trace_dir: str | None = None  # record every point-to-point call there (trace.py)
    progress: bool = False       # a progress bar over steps, shown by rank 0 only


def init_group(rank: int, world: int, backend: str, init_method: str | None,
               timeout_s: float) -> None:
    dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def check_plan_hash(plan: Plan, rank: int, world: int) -> None:
    """Every worker must run the same plan: compare hashes before step 0."""
    mine = torch.tensor(list(bytes.fromhex(plan.plan_hash)), dtype=torch.uint8)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    hashes = [bytes(t.tolist()).hex() for t in every]
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        raise RuntimeError(f"plan hash mismatch: rank 0 has {hashes[0]}, ranks {bad} have "
                           f"{[hashes[r] for r in bad]}; all workers must load the same plan")


def run_job(job: WorkerJob, rank: int, world: int) -> tuple[torch.Tensor, list]:
    """Sample on this rank's pipeline (at ``parallel.threads`` intra-op threads); returns the
    final latent and per-round stats. With a trace directory (``job.trace_dir`` or
    ``ASYNCDIFF_TRACE_COMM``) every point-to-point call is recorded there
    (``asyncdiff/distributed/trace.py``)."""
    where = trace.trace_dir(job.trace_dir)
    with intra_op_threads(job.parallel.threads), (
            trace.recording() if where else contextlib.nullcontext()) as calls:
        try:
            return _run_job(job, rank, world)
        finally:
            if where:
                trace.save(calls, where, rank)


def _run_job(job: WorkerJob, rank: int, world: int) -> tuple[torch.Tensor, list]:
    par = job.parallel
    per = par.devices
    if world != par.world:
        raise ValueError(f"world size {world}; allowed: replicas × groups × devices = "
                         f"{par.replicas} × {par.groups} × {per} = {par.world}")
    check_plan_hash(job.plan, rank, world)
    pipeline, device = divmod(rank, per)
    replica, group = divmod(pipeline, par.groups)
    task = job.sampling[replica]
    if par.cfg_parallel and task.guidance is None:
        raise ValueError("parallel.cfg_parallel=true without guidance; allowed: a guidance "
                         "scale (scheduler.guidance), or cfg_parallel=false")
    where = torch.device("cpu")
    if par.backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
        job.segments = [seg.to(where) for seg in job.segments]
        task = _to_device(task, where)
    scheduler = make_scheduler(task.scheduler, **task.scheduler_kwargs)
    scheduler.set_timesteps(task.steps)
    timeline = build_timeline(job.plan.n, par.stride, par.warmup, task.steps, par.time_shift,
                              par.stride_noise, par.cooldown, par.sync)
    lowered = lower(timeline, job.plan, groups=par.groups, replicas=par.replicas)
    check(lowered)  # a schedule that would hang under NCCL is refused here, never posted
    executor = DistributedExecutor(job.segments, job.plan, timeline, scheduler.timesteps,
                                   lowered.program(rank), job.specs, job.placeholders,
                                   job.output, TorchTransport(rank), torch_device=where,
                                   guidance=group if par.cfg_parallel else None,
                                   hoist_inputs=job.hoist_inputs)
    denoiser = PipelineDenoiser(executor)
    if par.cfg_parallel:  # this rank's half; the executor swaps the ε halves
        denoiser = GuidanceHalf(denoiser, group)
    if job.fault and job.fault.get("rank") == rank:
        denoiser = _Faulty(denoiser, job.fault, timeline)
    bar = _progress(task.steps, rank) if job.progress and rank == 0 else None
    out = sample(denoiser, make_scheduler(task.scheduler, **task.scheduler_kwargs), task.x_T,
                 task.cond, steps=task.steps, guidance_scale=task.guidance, uncond=task.uncond,
                 callback=(lambda info: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    return out, executor.stats


def _progress(steps: int, rank: int):
    from tqdm import tqdm
    return tqdm(total=steps, desc=f"asyncdiff (rank {rank})", unit="step", leave=False)


def _to_device(task: SamplingJob, where: torch.device) -> SamplingJob:
    def move(d):
        return None if d is None else {k: v.to(where) for k, v in d.items()}
    return SamplingJob(task.scheduler, task.steps, task.x_T.to(where), move(task.cond),
                       task.guidance, move(task.uncond), task.scheduler_kwargs)


class _Faulty:
    """Test hook: fail on purpose at the start of a given round (raise, SIGKILL, or hang)."""

    def __init__(self, inner, fault: dict, timeline):
        self.inner, self.fault, self.timeline = inner, fault, timeline

    def __call__(self, x, t, step, cond):
        if self.timeline.round_of(step).index == self.fault.get("round", 0):
            kind = self.fault.get("kind", "raise")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                time.sleep(3600)
            raise RuntimeError(f"injected fault at step {step}")
        return self.inner(x, t, step, cond)
