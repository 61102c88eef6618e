"""Every rank's loop in one process: one thread per rank, messages through
:class:`~asyncdiff.distributed.transport.LocalTransport`.

The same rank loop as the multi-process launchers (``worker.rank_loop``: the executor
interpreting its lowered program), with messages handed over in memory under NCCL's
matching rules. What it is for:

* CUDA short of two GPUs (``make gpu-check``): every rank's loop on one GPU, its sends
  lowered, its round times taken with CUDA events, and the host synchronisations inside the
  steady loop (every parallel round) counted (``torch.cuda.set_sync_debug_mode``);
* a fast check on the CPU that the executor equals the emulator, without processes.

Ranks share the staged model's modules (a stride copy runs the same stage-N−1 modules as the
copy beside it); they only read them.
"""
from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from asyncdiff.distributed.sharing import rank_stage
from asyncdiff.distributed.transport import LocalTransport, PeerError
from asyncdiff.distributed.worker import SamplingJob, WorkerJob, rank_loop
from asyncdiff.schedule import Schedule
from asyncdiff.timeline import stage_of_device
from partition.plan import Plan
from partition.stages import StagedModel


@dataclass
class LocalResult:
    latents: list[torch.Tensor]   # the final latent of each replica (its first rank's)
    stats: dict[int, list]        # rank -> per-round RoundStats
    syncs: dict[int, int]         # rank -> host synchronisations inside its parallel rounds


def run_local(staged: StagedModel, plan: Plan, schedule: Schedule,
              sampling: Sequence[SamplingJob], device: str | torch.device = "cpu",
              timeout_s: float = 120.0, fault: dict | None = None) -> LocalResult:
    """Run ``len(sampling)`` replicas of the pipeline on ``device``, one thread per rank. A
    rank that raises stops the others (a :class:`RuntimeError` naming it). ``fault``: a
    test's failure for one rank (``worker.inject``: ``raise`` only, in a thread)."""
    device = torch.device(device)
    if device.type == "cuda":
        staged = copy.deepcopy(staged).to(device)
    world = LocalTransport.World(schedule.world_size(), timeout_s)
    results: dict[int, tuple] = {}
    errors: dict[int, BaseException] = {}
    steady = threading.local()
    counts = {r: 0 for r in range(schedule.world_size())}

    def rank(r: int) -> None:
        own = rank_stage(staged, stage_of_device(schedule.place(r)[2], plan.n))
        job = WorkerJob(plan=plan, segments=own.parts, hoist_inputs=own.hoist_inputs,
                        specs=staged.specs, placeholders=staged.placeholders,
                        output=staged.output, schedule=schedule, sampling=list(sampling),
                        fault=fault)
        steady.rank = r
        try:
            results[r] = rank_loop(job, r, LocalTransport(world, r), device,
                                   wrap=lambda ex: _Steady(ex, steady))
        except BaseException as err:  # noqa: BLE001 - reported below, naming the rank
            errors[r] = err
            LocalTransport(world, r).fail(f"rank {r} failed: {type(err).__name__}: {err}")

    with _counting(steady, counts, device):
        threads = [threading.Thread(target=rank, args=(r,), name=f"asyncdiff-rank-{r}")
                   for r in range(schedule.world_size())]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:  # a rank's own failure, not a peer's view of it
        own = [r for r, e in errors.items() if not isinstance(e, PeerError)]
        first = min(own or errors)
        raise RuntimeError(f"rank {first} failed: {type(errors[first]).__name__}: "
                           f"{errors[first]}") from errors[first]
    per = schedule.devices * schedule.groups
    return LocalResult([results[i * per][0] for i in range(schedule.replicas)],
                       {r: res[1] for r, res in results.items()}, counts)


class _Steady:
    """Marks this thread as inside a parallel round while the executor runs one."""

    def __init__(self, executor, flag: threading.local):
        self.executor, self.flag, self.timeline = executor, flag, executor.timeline

    def run_round(self, rnd, x, cond):
        self.flag.on = not rnd.sequential
        try:
            return self.executor.run_round(rnd, x, cond)
        finally:
            self.flag.on = False


class _counting:
    """Count, per rank, the host synchronisations a thread makes inside a parallel round:
    CUDA's sync debug mode warns at each, and the warning is raised in the thread that
    synchronised. Nothing to count on the CPU."""

    def __init__(self, flag: threading.local, counts: dict[int, int], device: torch.device):
        self.flag, self.counts, self.on = flag, counts, device.type == "cuda"
        self.lock = threading.Lock()

    def __enter__(self):
        if not self.on:
            return self
        self._filters = warnings.filters[:]
        self._show = warnings.showwarning
        warnings.simplefilter("always", UserWarning)

        def show(message, category, *args, **kwargs):
            if getattr(self.flag, "on", False) and "synchroniz" in str(message):
                with self.lock:
                    self.counts[self.flag.rank] += 1
                return None
            return self._show(message, category, *args, **kwargs)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.on:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._show
            warnings.filters[:] = self._filters
