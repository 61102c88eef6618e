"""One command that spawns the P = R·(N−1+S) workers itself on this machine.

The parent compiles nothing and runs nothing: it hands each rank its own stage's segments,
starts the workers with ``torch.multiprocessing.start_processes`` and watches them through its
``ProcessContext``, and collects the results. The rendezvous is a ``TCPStore`` the parent
owns: it binds the port itself (port 0: the system picks a free one) and keeps it for the whole
run, so no other process can take it between choosing and using (a "free port" looked up and
then released can). A worker that raises or dies makes the parent stop every other worker at
once and raise :class:`WorkerError` naming the rank and the cause; Ctrl-C stops them all too.
No process is left behind.
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
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asyncdiff.dist.worker import ParallelSpec, SamplingJob, WorkerJob, run_job
from asyncdiff.timeline import stage_of_device
from partition.plan import Plan
from partition.stages import StagedModel

HOST = "127.0.0.1"


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
        mp.get_context("forkserver").set_forkserver_preload(["asyncdiff.dist.launch"])
        return "forkserver"
    return "spawn"


def _dumps(obj) -> bytes:
    """Tensors travel as bytes: the forkserver refuses hundreds of shared-memory handles."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _entry(rank: int, world: int, port: int, jobs: str, results) -> None:
    """One worker (``start_processes`` passes its index as ``rank``); its job is the file
    ``<jobs>/<rank>.pt`` (each worker reads only its own stage)."""
    try:
        job: WorkerJob = torch.load(os.path.join(jobs, f"{rank}.pt"), weights_only=False)
        os.environ.setdefault("OMP_NUM_THREADS", str(job.parallel.threads))
        timeout = datetime.timedelta(seconds=job.parallel.timeout_s)
        store = dist.TCPStore(HOST, port, world, is_master=False, timeout=timeout)
        dist.init_process_group(job.parallel.backend, store=store, rank=rank,
                                world_size=world, timeout=timeout)
        dist.barrier()
        t0 = time.perf_counter()
        out, stats = run_job(job, rank, world)
        wall = time.perf_counter() - t0
        per = job.parallel.devices
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results.put(("ok", rank, _dumps(out) if rank % per == 0 else None, (stats, peak), wall))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then exit non-zero
        cause = f"{type(err).__name__}: {err}".strip().splitlines()[0]
        results.put(("error", rank, cause, traceback.format_exc(), None))
        raise SystemExit(1)


def launch(staged: StagedModel, plan: Plan, parallel: ParallelSpec, sampling: list[SamplingJob],
           *, fault: dict | None = None, timeout_s: float | None = None,
           plans: dict[int, Plan] | None = None, progress: bool = False) -> LaunchResult:
    """Run ``len(sampling)`` = R pipelines of N−1+S workers each; return their latents.

    ``plans`` (tests) gives some ranks a different plan, to check the hash comparison.
    ``timeout_s``: the whole run (default ``parallel.run_timeout_s``); each wait for a peer is
    bounded by ``parallel.timeout_s`` (both: asyncdiff/dist/limits.py).
    """
    timeout_s = parallel.run_timeout_s if timeout_s is None else timeout_s
    if len(sampling) != parallel.replicas:
        raise ValueError(f"sampling: {len(sampling)} jobs for replicas={parallel.replicas}; "
                         "allowed: one job per replica")
    per = parallel.devices
    world = parallel.replicas * per
    with tempfile.TemporaryDirectory(prefix="asyncdiff-jobs-") as jobs:
        for rank in range(world):
            stage = stage_of_device(rank % per, plan.n)
            torch.save(WorkerJob(
                plan=(plans or {}).get(rank, plan),
                segments=[p.stripped() for p in staged.stage_parts(stage)], specs=staged.specs,
                placeholders=staged.placeholders, output=staged.output, parallel=parallel,
                sampling=sampling, fault=fault, progress=progress),
                os.path.join(jobs, f"{rank}.pt"))
        method = _start_method()
        results = mp.get_context(method).Queue()
        store = dist.TCPStore(HOST, 0, world + 1, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=parallel.timeout_s))
        ctx = mp.start_processes(_entry, args=(world, store.port, jobs, results), nprocs=world,
                                 join=False, start_method=method)
        try:
            return _collect(ctx, results, per, parallel.replicas, timeout_s)
        except WorkerError as err:
            _stop(ctx)
            err.pids = tuple(ctx.pids())
            raise
        finally:
            _stop(ctx)  # also on Ctrl-C
            del store   # the rendezvous lives exactly as long as the run


def _collect(ctx, results, per: int, replicas: int, timeout_s: float) -> LaunchResult:
    latents: dict[int, torch.Tensor] = {}
    stats: dict[int, list] = {}
    peaks: dict[int, int] = {}
    walls = []
    world = len(ctx.processes)
    deadline = time.monotonic() + timeout_s
    while len(stats) < world:
        try:
            kind, rank, payload, extra, wall = results.get(timeout=0.2)
        except queue.Empty:
            for rank, p in enumerate(ctx.processes):
                if p.exitcode not in (None, 0) and rank not in stats:
                    raise WorkerError(f"rank {rank} died (exit code {p.exitcode}) before "
                                      "reporting; stopped every other worker")
            if time.monotonic() > deadline:
                raise WorkerError(f"no result within {timeout_s:.0f} s; stopped every worker")
            continue
        if kind == "error":
            raise WorkerError(f"rank {rank} failed: {payload}; stopped every other worker\n"
                              f"{extra}")
        stats[rank], peaks[rank] = extra
        walls.append(wall)
        if payload is not None:
            latents[rank // per] = _loads(payload)
    ctx.join(timeout=10)
    return LaunchResult([latents[r] for r in range(replicas)], stats, max(walls), peaks)


def _stop(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
