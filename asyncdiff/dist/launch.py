"""One command that spawns the P = R·(N−1+S) workers itself on this machine.

The parent compiles nothing and runs nothing: it hands each rank its own stage's segments
(pickled), watches the workers, and collects the results. A worker that raises or dies
makes the parent stop every other worker at once and raise :class:`WorkerError` naming
the rank and the cause; Ctrl-C stops them all too. No process is left behind.
"""
from __future__ import annotations

import io
import os
import queue
import resource
import socket
import time
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from asyncdiff.dist.worker import ParallelSpec, SamplingJob, WorkerJob, init_group, run_job
from partition.plan import Plan
from partition.stages import StagedModel


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


def _context():
    """forkserver with the runtime preloaded: workers start in well under a second instead
    of each importing torch and diffusers again (seconds on 2 cores); spawn where there is
    no forkserver (Windows, macOS defaults)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["asyncdiff.dist.launch"])
        return ctx
    return mp.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj) -> bytes:
    """Tensors travel as bytes: the forkserver refuses hundreds of shared-memory handles."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _entry(rank: int, world: int, port: int, job_bytes: bytes, results) -> None:
    try:
        job: WorkerJob = _loads(job_bytes)
        os.environ.setdefault("OMP_NUM_THREADS", str(job.parallel.threads))
        init_group(rank, world, job.parallel.backend, f"tcp://127.0.0.1:{port}",
                   job.parallel.timeout_s)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        out, stats = run_job(job, rank, world)
        wall = time.perf_counter() - t0
        per = job.parallel.devices
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results.put(("ok", rank, _dumps(out) if rank % per == 0 else None, (stats, peak), wall))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then exit non-zero
        cause = f"{type(err).__name__}: {err}".strip().splitlines()[0]
        results.put(("error", rank, cause, traceback.format_exc(), None))
        raise SystemExit(1)


def launch(staged: StagedModel, plan: Plan, parallel: ParallelSpec, sampling: list[SamplingJob],
           *, fault: dict | None = None, timeout_s: float = 600.0,
           plans: dict[int, Plan] | None = None, progress: bool = False) -> LaunchResult:
    """Run ``len(sampling)`` = R pipelines of N−1+S workers each; return their latents.

    ``plans`` (tests) gives some ranks a different plan, to check the hash comparison.
    """
    if len(sampling) != parallel.replicas:
        raise ValueError(f"sampling: {len(sampling)} jobs for replicas={parallel.replicas}; "
                         "allowed: one job per replica")
    per = parallel.devices
    world = parallel.replicas * per
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = []
    for rank in range(world):
        device = rank % per
        stage = min(device, plan.n - 1)
        job = WorkerJob(plan=(plans or {}).get(rank, plan), segments=[p.stripped() for p in staged.stage_parts(stage)],
                        specs=staged.specs, placeholders=staged.placeholders,
                        output=staged.output, parallel=parallel, sampling=sampling, fault=fault,
                        progress=progress)
        p = ctx.Process(target=_entry, args=(rank, world, port, _dumps(job), results), daemon=True,
                        name=f"asyncdiff-rank{rank}")
        p.start()
        procs.append(p)
    try:
        return _collect(procs, results, per, parallel.replicas, timeout_s)
    except WorkerError as err:
        _stop(procs)
        err.pids = tuple(p.pid for p in procs)
        raise
    finally:
        _stop(procs)  # also on Ctrl-C


def _collect(procs, results, per: int, replicas: int, timeout_s: float) -> LaunchResult:
    latents: dict[int, torch.Tensor] = {}
    stats: dict[int, list] = {}
    peaks: dict[int, int] = {}
    walls = []
    deadline = time.monotonic() + timeout_s
    while len(stats) < len(procs):
        try:
            kind, rank, payload, extra, wall = results.get(timeout=0.2)
        except queue.Empty:
            for rank, p in enumerate(procs):
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
    for p in procs:
        p.join(timeout=10)
    return LaunchResult([latents[r] for r in range(replicas)], stats, max(walls), peaks)


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
