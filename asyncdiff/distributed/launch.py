"""One command that spawns the P = R·(N−1+S) workers itself on this machine.

The parent compiles nothing and runs nothing: it hands each rank its own stage's segments,
starts the workers with ``torch.multiprocessing.start_processes`` and watches them through its
``ProcessContext``, and collects the results. The rendezvous is a ``TCPStore`` the parent
owns: it binds the port itself (port 0: the system picks a free one) and keeps it for the whole
run, so no other process can take it between choosing and using (a "free port" looked up and
then released can). A worker that raises or dies makes the parent stop every other worker at
once and raise :class:`WorkerError` naming the rank and the cause; Ctrl-C stops them all too.
No process is left behind. :func:`launch_all` runs several runs of one world size on one set
of workers.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asyncdiff.distributed import liveness
from asyncdiff.distributed.limits import STARTUP_S, Limits
from asyncdiff.distributed.sharing import rank_stage
from asyncdiff.distributed.worker import SamplingJob, WorkerJob, init_group, inject, run_job
from asyncdiff.schedule import Schedule
from asyncdiff.timeline import stage_of_device
from partition.plan import Plan
from partition.stages import StagedModel

HOST = "127.0.0.1"
EXIT_S = 30.0  # after the last result, how long the ranks have to leave the group and exit


class WorkerError(RuntimeError):
    """A worker failed; the message names its rank and the cause. ``pids``: every worker's
    process id (all of them stopped by the time this is raised)."""

    pids: tuple[int, ...] = ()


@dataclass
class LaunchResult:
    latents: list[torch.Tensor]       # final latent of each replica
    stats: dict[int, list]            # rank -> per-round RoundStats
    wall_s: float                     # from the first step to the last result
    peak_rss: dict[int, int]          # rank -> peak resident memory, bytes


def _start_method() -> str:
    """forkserver with the runtime preloaded: workers start in well under a second instead
    of each importing torch and diffusers again (seconds on 2 cores); spawn where there is
    no forkserver (Windows, macOS defaults)."""
    if "forkserver" in mp.get_all_start_methods():
        mp.get_context("forkserver").set_forkserver_preload(["asyncdiff.distributed.launch"])
        return "forkserver"
    return "spawn"


def to_bytes(obj) -> bytes:
    """Tensors travel as bytes: the forkserver refuses hundreds of shared-memory handles."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


@dataclass(frozen=True)
class Task:
    """What every spawned rank runs: ``fn(rank, world, arg)`` inside the initialised group,
    returning ``(payload, extra)``: ``payload`` bytes (or None) and ``extra`` any picklable
    value, both handed to the parent. ``fn`` must be importable (a module-level function)."""

    fn: Callable[[int, int, Any], tuple[bytes | None, Any]]
    arg: Any
    backend: str
    startup_s: float = STARTUP_S  # before the first step, the longest wait at a meeting point
    #                               (the loop's step limit is the task's: liveness.loop_group)


@dataclass
class RankResult:
    payload: bytes | None
    extra: Any
    peak_rss: int       # bytes
    wall_s: float       # the task's own time (after the rendezvous)


def _entry(rank: int, world: int, port: int, task: Task, results) -> None:
    """One worker (``start_processes`` passes its index as ``rank``)."""
    try:
        _bars_without_semaphore()
        # start-up goes through the store (liveness.py): the group's own bound is a backstop
        timeout = datetime.timedelta(seconds=task.startup_s)
        store = dist.TCPStore(HOST, port, world, is_master=False, timeout=timeout)
        init_group(rank, world, task.backend, None, task.startup_s, store=store)
        liveness.arrive("the start")
        t0 = time.perf_counter()
        payload, extra = task.fn(rank, world, task.arg)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results.put(("ok", rank, payload, (extra, peak), wall))
        liveness.arrive("the end")
        liveness.stop()
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then exit non-zero
        cause = f"{type(err).__name__}: {err}".strip().splitlines()[0]
        results.put(("error", rank, cause, traceback.format_exc(), None))
        results.close()
        results.join_thread()         # the report is out before
        liveness.put_down_pending()   # a rank this one put down dies (the forkserver's
        raise SystemExit(1)           # children end with os._exit: no atexit)


def _bars_without_semaphore() -> None:
    """tqdm's default lock is also a multiprocessing semaphore, which a rank stopped by the
    parent (because another failed) would leave behind for the resource tracker to report.
    One process draws its own bar (only rank 0 of a run draws one): a thread lock will do."""
    import threading

    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())


def run_ranks(task: Task, world: int, timeout_s: float) -> dict[int, RankResult]:
    """Spawn ``world`` ranks of ``task`` on this machine and return each rank's result.

    A rank that raises or dies stops every other at once (:class:`WorkerError` naming it);
    so does a run past ``timeout_s``, or Ctrl-C. No process is left behind."""
    method = _start_method()
    results = mp.get_context(method).Queue()
    store = dist.TCPStore(HOST, 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=task.startup_s))
    ctx = mp.start_processes(_entry, args=(world, store.port, task, results), nprocs=world,
                             join=False, start_method=method)
    try:
        return _collect(ctx, results, timeout_s, store)
    except WorkerError as err:
        _stop(ctx)
        err.pids = tuple(ctx.pids())
        raise
    finally:
        _stop(ctx)  # also on Ctrl-C
        _release(ctx, results)
        del store   # the rendezvous lives exactly as long as the run


def _release(ctx, results) -> None:
    """The result queue (its pipe and feeder thread) and the stopped processes' handles."""
    results.close()
    results.join_thread()
    for p in ctx.processes:
        if p.exitcode is not None:
            p.close()


@dataclass(frozen=True)
class Run:
    """One sampling run for :func:`launch_all`: ``len(sampling)`` = R replicas of the
    pipeline ``schedule`` describes, on ``plan``'s stages (``staged``)."""

    staged: StagedModel
    plan: Plan
    schedule: Schedule
    sampling: list[SamplingJob]
    threads: int = 1
    backend: str = "gloo"
    limits: Limits = field(default_factory=Limits)
    fault: dict | None = None             # tests: worker.inject
    plans: dict[int, Plan] | None = None  # tests: another plan for some ranks
    progress: bool = False
    trace_dir: str | None = None          # each rank records its point-to-point calls there


def _sampling(rank: int, world: int, runs: list[str]) -> tuple[bytes | None, list]:
    """The sampling task: each run's job is the file ``<run>/<rank>.pt`` (each worker reads
    only its own stage); the first device of each replica returns the replica's latent."""
    outs, extra = [], []
    for where in runs:
        job: WorkerJob = torch.load(os.path.join(where, f"{rank}.pt"), weights_only=False)
        inject(job.fault, rank, "start")
        t0 = time.perf_counter()
        out, stats = run_job(job, rank, world)
        extra.append((stats, time.perf_counter() - t0))
        first = rank % (job.schedule.devices * job.schedule.groups) == 0
        outs.append(out if first else None)
    return (to_bytes(outs) if any(o is not None for o in outs) else None), extra


def launch(staged: StagedModel, plan: Plan, schedule: Schedule, sampling: list[SamplingJob],
           *, threads: int = 1, backend: str = "gloo", limits: Limits | None = None,
           timeout_s: float | None = None, fault: dict | None = None,
           plans: dict[int, Plan] | None = None, progress: bool = False,
           trace_dir: str | None = None) -> LaunchResult:
    """Run ``len(sampling)`` = R pipelines of ``schedule.devices`` workers each (two per
    replica with CFG-parallel, one per guidance half, each on ``plan``); return their
    latents. ``limits``: the waits (``asyncdiff/distributed/limits.py``; default: a tiny
    model's); ``timeout_s``: the whole run (default ``limits.run_s``)."""
    run = Run(staged, plan, schedule, sampling, threads, backend, limits or Limits(), fault,
              plans, progress, trace_dir)
    return launch_all([run], timeout_s)[0]


def launch_all(runs: list[Run], timeout_s: float | None = None) -> list[LaunchResult]:
    """Several runs of one world size on one set of workers, spawned once, one run after the
    other (a sweep over schedules, a test matrix). ``timeout_s``: all of them (default: the
    sum of their ``limits.run_s``)."""
    worlds = {r.schedule.world_size() for r in runs}
    backends = {r.backend for r in runs}
    if len(worlds) != 1 or len(backends) != 1:
        raise ValueError(f"launch_all: world sizes {sorted(worlds)}, backends {sorted(backends)};"
                         " allowed: one world size and one backend (one set of workers)")
    for run in runs:
        _check(run)
    world = worlds.pop()
    timeout_s = sum(r.limits.run_s for r in runs) if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix="asyncdiff-jobs-") as jobs:
        dirs = []
        for i, run in enumerate(runs):
            dirs.append(os.path.join(jobs, str(i)))
            os.makedirs(dirs[-1])
            _write_jobs(run, world, dirs[-1])
        task = Task(_sampling, dirs, backends.pop(), max(r.limits.startup_s for r in runs))
        done = run_ranks(task, world, timeout_s)
    results = []
    for i, run in enumerate(runs):
        sch = run.schedule
        per = sch.devices * sch.groups
        latents = {r // per: from_bytes(d.payload)[i] for r, d in done.items()
                   if d.payload is not None and r % per == 0}
        results.append(LaunchResult([latents[k] for k in range(sch.replicas)],
                                    {r: d.extra[i][0] for r, d in done.items()},
                                    max(d.extra[i][1] for d in done.values()),
                                    {r: d.peak_rss for r, d in done.items()}))
    return results


def _check(run: Run) -> None:
    if len(run.sampling) != run.schedule.replicas:
        raise ValueError(f"sampling: {len(run.sampling)} jobs for replicas="
                         f"{run.schedule.replicas}; allowed: one job per replica")
    if len({job.steps for job in run.sampling}) != 1:
        raise ValueError(f"sampling: steps {[job.steps for job in run.sampling]}; allowed: the "
                         "same number of steps in every replica (one timeline)")


def _write_jobs(run: Run, world: int, where: str) -> None:
    """Each rank's job file: its own stage's segments only."""
    for rank in range(world):
        _, _, device = run.schedule.place(rank)
        own = rank_stage(run.staged, stage_of_device(device, run.plan.n))
        torch.save(WorkerJob(
            plan=(run.plans or {}).get(rank, run.plan),
            segments=[p.stripped() for p in own.parts], hoist_inputs=own.hoist_inputs,
            specs=run.staged.specs, placeholders=run.staged.placeholders,
            output=run.staged.output, schedule=run.schedule, sampling=run.sampling,
            threads=run.threads, backend=run.backend, limits=run.limits, fault=run.fault,
            progress=run.progress, trace_dir=run.trace_dir), os.path.join(where, f"{rank}.pt"))


def _collect(ctx, results, timeout_s: float, store=None) -> dict[int, RankResult]:
    done: dict[int, RankResult] = {}
    world = len(ctx.processes)
    deadline = time.monotonic() + timeout_s
    while len(done) < world:
        try:
            kind, rank, payload, extra, wall = results.get(timeout=0.2)
        except queue.Empty:
            for rank, p in enumerate(ctx.processes):
                if p.exitcode not in (None, 0) and rank not in done:
                    said = liveness.records(store, world) if store is not None else {}
                    why = f": {said[rank]}" if rank in said else ""
                    raise WorkerError(f"rank {rank} died (exit code {p.exitcode}) before "
                                      f"reporting{why}; stopped every other worker")
            if time.monotonic() > deadline:
                raise WorkerError(f"no result within {timeout_s:.0f} s; stopped every worker")
            continue
        if kind == "error":
            # a peer's view of a failure (it waited on a rank that died, stopped or is itself
            # waiting): give the rank that found the culprit time to put it down
            grace = liveness.SILENT_S + 2.0 if payload.startswith(("PeerError",
                                                                   "StartupError")) else 1.0
            dead = _killed(ctx, rank, grace)
            said = liveness.records(store, world) if store is not None else {}
            if dead is not None and dead[0] in said:  # put down by a peer, or ended itself
                raise WorkerError(f"rank {dead[0]} stopped answering ({said[dead[0]]}); "
                                  f"rank {rank} saw: {payload}; stopped every other worker")
            if dead is not None:  # the error is a peer's view of a rank that died first
                raise WorkerError(f"rank {dead[0]} died (exit code {dead[1]}); rank {rank} "
                                  f"saw: {payload}; stopped every other worker")
            raise WorkerError(f"rank {rank} failed: {payload}; stopped every other worker\n"
                              f"{extra}")
        done[rank] = RankResult(payload, extra[0], extra[1], wall)
    # every rank has reported and now leaves the group and exits on its own: one stopped
    # while it tears down would leave what it holds behind (_stop ends any still there)
    deadline = time.monotonic() + EXIT_S
    for p in ctx.processes:
        p.join(timeout=max(deadline - time.monotonic(), 0.0))
    return done


def _killed(ctx, reporter: int, grace_s: float = 1.0) -> tuple[int, int] | None:
    """(rank, exit code) of a worker other than ``reporter`` killed by a signal, waiting up to
    ``grace_s`` for one (a peer notices a death within moments of it)."""
    deadline = time.monotonic() + grace_s
    while True:
        for rank, p in enumerate(ctx.processes):
            if rank != reporter and p.exitcode is not None and p.exitcode < 0:
                return rank, p.exitcode
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _stop(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
