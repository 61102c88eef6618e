"""What one worker process does: join the group, agree on the plan, sample, report.

Used by the self-spawning launcher (``asyncdiff/distributed/launch.py``) and, under ``torchrun``,
by an entry point that builds the job itself (ranks and the rendezvous come from env://).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.distributed import liveness, trace
from asyncdiff.distributed.executor import DistributedExecutor
from asyncdiff.distributed.sharing import check_plan_hash
from asyncdiff.distributed.transport import TorchTransport, Transport
from asyncdiff.guidance import GuidanceHalf
from asyncdiff.distributed.limits import Limits
from asyncdiff.lowering import checked_program
from asyncdiff.schedule import Schedule
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
class WorkerJob:
    """Everything rank ``rank`` needs; its ``segments`` are its own stage's only."""

    plan: Plan
    segments: list[Segment]
    specs: tuple
    placeholders: dict
    output: str
    schedule: Schedule
    sampling: list[SamplingJob]  # one per replica
    threads: int = 1             # intra-op threads of this rank
    backend: str = "gloo"        # gloo (CPU) or nccl (CUDA)
    limits: Limits = field(default_factory=Limits)  # the waits (limits.py)
    hoist_inputs: tuple[str, ...] = ()  # model inputs every stage's prologues read
    fault: dict | None = None    # tests: {"rank": r, "at": round or point, "kind": …} (inject)
    trace_dir: str | None = None  # record every point-to-point call there (trace.py)
    progress: bool = False       # a progress bar over steps, shown by rank 0 only


def init_group(rank: int, world: int, backend: str, init_method: str | None,
               timeout_s: float, store=None) -> None:
    """The default process group, with this rank's liveness started first in its store (a
    rank that stops while the others still connect is named: ``liveness.py``). ``store``:
    the rendezvous store when the caller made it, else rendezvous at ``init_method``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store, rank, world = next(dist.rendezvous(init_method or "env://", rank, world,
                                                  timeout=timeout))
        store.set_timeout(timeout)
    liveness.start(timeout_s, store, rank, world)
    with liveness.connecting("the process group"):
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)


def rank_device(backend: str, rank: int) -> torch.device:
    """This rank's device: the CPU under gloo; under nccl the GPU of its ``LOCAL_RANK`` (its
    place on its own node, as torchrun numbers it; a self-spawned rank's is its rank)."""
    if backend != "nccl":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local)


def placement(backend: str, rank: int) -> dict:
    """Where this rank runs: host, place on its node, device (recorded per rank)."""
    return {"host": socket.gethostname(), "local_rank": int(os.environ.get("LOCAL_RANK", rank)),
            "torch_device": str(rank_device(backend, rank))}


def run_job(job: WorkerJob, rank: int, world: int) -> tuple[torch.Tensor, list]:
    """Sample on this rank's pipeline (at ``job.threads`` intra-op threads); returns the
    final latent and per-round stats. With a trace directory (``job.trace_dir`` or
    ``ASYNCDIFF_TRACE_COMM``) every point-to-point call is recorded there
    (``asyncdiff/distributed/trace.py``)."""
    where = trace.trace_dir(job.trace_dir)
    with intra_op_threads(job.threads), (
            trace.recording() if where else contextlib.nullcontext()) as calls:
        try:
            return _run_job(job, rank, world)
        finally:
            if where:
                trace.save(calls, where, rank)


def _run_job(job: WorkerJob, rank: int, world: int) -> tuple[torch.Tensor, list]:
    sch = job.schedule
    if world != sch.world_size():
        raise ValueError(f"world size {world}; allowed: replicas × groups × devices = "
                         f"{sch.replicas} × {sch.groups} × {sch.devices} = {sch.world_size()}")
    check_plan_hash(job.plan)
    where = rank_device(job.backend, rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    step_s = job.limits.step_s  # each wait of the loop
    return rank_loop(job, rank, TorchTransport(rank, liveness.loop_group(step_s, where), step_s),
                     where)


def rank_loop(job: WorkerJob, rank: int, transport: Transport, where: torch.device,
              wrap=None) -> tuple[torch.Tensor, list]:
    """One rank's sampling loop on ``where``, its messages through ``transport``: what every
    launcher runs (processes over torch.distributed, or threads: ``local.py``). ``wrap``: an
    optional wrapper of the executor (its ``run_round``), for measurements."""
    sch = job.schedule
    replica, group, _ = sch.place(rank)
    task = job.sampling[replica]
    if sch.cfg_parallel and task.guidance is None:
        raise ValueError("parallel.cfg_parallel=true without guidance; allowed: a guidance "
                         "scale (scheduler.guidance), or cfg_parallel=false")
    segments = job.segments
    if where.type == "cuda":
        torch.cuda.set_device(where)
        segments = [seg.to(where) for seg in segments]
        task = _to_device(task, where)
    scheduler = make_scheduler(task.scheduler, **task.scheduler_kwargs)
    scheduler.set_timesteps(task.steps)
    timeline = sch.timeline(task.steps)
    # a schedule that would hang under NCCL is refused here, never posted
    program = checked_program(timeline, job.plan, rank, groups=sch.groups,
                              replicas=sch.replicas)
    executor = DistributedExecutor(segments, job.plan, timeline, scheduler.timesteps,
                                   program, job.specs, job.placeholders, job.output, transport,
                                   torch_device=where,
                                   guidance=group if sch.cfg_parallel else None,
                                   hoist_inputs=job.hoist_inputs)
    denoiser = PipelineDenoiser(wrap(executor) if wrap is not None else executor)
    if sch.cfg_parallel:  # this rank's half; the executor swaps the ε halves
        denoiser = GuidanceHalf(denoiser, group)
    if job.fault and job.fault.get("rank") == rank:
        denoiser = _Faulty(denoiser, job.fault, timeline, rank)
    bar = _progress(task.steps, rank) if job.progress and rank == 0 else None
    out = sample(denoiser, make_scheduler(task.scheduler, **task.scheduler_kwargs), task.x_T,
                 task.cond, steps=task.steps, guidance_scale=task.guidance, uncond=task.uncond,
                 callback=(lambda info: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    return out, executor.stats


def _progress(steps: int, rank: int):
    from tqdm import tqdm
    # on a terminal only: a log file gets no carriage-return updates (tqdm: disable=None)
    return tqdm(total=steps, desc=f"asyncdiff (rank {rank})", unit="step", leave=False,
                disable=None)


def _to_device(task: SamplingJob, where: torch.device) -> SamplingJob:
    def move(d):
        return None if d is None else {k: v.to(where) for k, v in d.items()}
    return SamplingJob(task.scheduler, task.steps, task.x_T.to(where), move(task.cond),
                       task.guidance, move(task.uncond), task.scheduler_kwargs)


FAULT_ENV = "ASYNCDIFF_TEST_FAULT"  # tests: a fault for a torchrun rank, as JSON


def fault_from_env() -> dict | None:
    text = os.environ.get(FAULT_ENV)
    return json.loads(text) if text else None


def inject(fault: dict | None, rank: int, where: str | int, what: str = "") -> None:
    """Test hook: fail on purpose if ``fault`` targets this rank at ``where`` (a start-up
    point, or a round): ``raise``, ``kill`` (SIGKILL), ``hang`` (sleep) or ``stop``
    (SIGSTOP: a rank that neither answers nor dies)."""
    if not fault or fault.get("rank") != rank or fault.get("at", 0) != where:
        return
    kind = fault.get("kind", "raise")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if kind == "hang":
        time.sleep(3600)
    raise RuntimeError(f"injected fault at {where} {what}".strip())


class _Faulty:
    """Test hook: :func:`inject` at the start of each round (``fault["at"]``: its index)."""

    def __init__(self, inner, fault: dict, timeline, rank: int):
        self.inner, self.fault, self.timeline, self.rank = inner, fault, timeline, rank

    def __call__(self, x, t, step, cond):
        rnd = self.timeline.round_of(step)
        if rnd.steps[0] == step:
            inject(self.fault, self.rank, rnd.index, f"(step {step})")
        return self.inner(x, t, step, cond)
