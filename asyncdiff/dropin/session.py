"""One compiled denoiser per call shape, and the executor of one pipeline run on it.

``emulate``: the whole staged model in this process (:class:`asyncdiff.emulate.Emulator`).
``distributed``: every rank captures the denoiser (the stages are rebuilt from the capture),
rank 0 plans and broadcasts the plan JSON, and each rank keeps only its own stage's segments
(:func:`partition.stages_from_plan`), as ``experiments/run.py`` does under torchrun.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from asyncdiff.dist.executor import DistributedExecutor, stage_of_device
from asyncdiff.dropin.call import Call
from asyncdiff.emulate import Emulator
from asyncdiff.timeline import Timeline
from partition import Compiled, PartitionRequest, Plan, compile_model, stages_from_plan
from partition.capture import Captured
from partition.cost import NodeCosts
from partition.graph import build_graph
from partition.stages import Segment, StagedModel


@dataclass(frozen=True)
class Options:
    """What :func:`asyncdiff.parallelize` was asked for (validated there)."""

    n: int
    stride: int
    warmup: int
    time_shift: bool
    stride_noise: str
    strategy: str
    cost_model: str
    depth: int | None
    mode: str
    offload: str


@dataclass(eq=False)
class Session:
    """A compiled denoiser for one call key. ``staged``: every stage (emulate) or ``None``
    (distributed, where ``segments`` are this rank's only)."""

    key: tuple
    plan: Plan
    form: Any  # how the model answers: tuple, Tensor or its output dataclass
    specs: tuple
    placeholders: dict
    output: str
    staged: StagedModel | None = None
    segments: tuple[Segment, ...] = ()
    rank: int = 0

    def executor(self, timeline: Timeline, timesteps: Sequence[float], device: torch.device):
        if self.staged is not None:
            return Emulator(self.staged, self.plan, timeline, timesteps)
        return DistributedExecutor(list(self.segments), self.plan, timeline, timesteps,
                                   self.rank, 0, self.specs, self.placeholders, self.output,
                                   device)

    def tensors(self) -> list[torch.Tensor]:
        """The parameters and buffers this session's segments hold."""
        mods = [s.gm for s in self.segments] if self.staged is None else \
            [s.gm for s in [*self.staged.segments, *self.staged.prologues]]
        return [t for m in mods for t in (*m.parameters(), *m.buffers())]


def config_hash(module: nn.Module) -> str:
    config = dict(getattr(module, "config", {}) or {})
    text = json.dumps({"class": type(module).__qualname__, "config": config}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def compile_call(module: nn.Module, call: Call, captured: Captured, opts: Options) -> Compiled:
    """Plan the captured call into ``opts.n`` stages (the one place a plan is made)."""
    return compile_model(module, captured.specs, call.tensors,
                         PartitionRequest(n=opts.n, depth=opts.depth),
                         strategy=opts.strategy, cost_model=opts.cost_model,
                         name=type(module).__name__, config_hash=config_hash(module),
                         repeats=3 if opts.cost_model == "time" else 0,
                         threads=torch.get_num_threads(), captured=captured)


def emulated(module: nn.Module, call: Call, captured: Captured, form: Any,
             opts: Options) -> Session:
    compiled = compile_call(module, call, captured, opts)
    staged = compiled.staged
    return Session(call.key, compiled.plan, form, staged.specs, staged.placeholders,
                   staged.output, staged=staged)


def distributed(module: nn.Module, call: Call, capture: Callable[[], tuple[Captured, Any]],
                opts: Options) -> Session:
    """Every rank captures; rank 0 plans and broadcasts; each rank keeps its own stage.

    A failure on any rank (capture or planning) is raised on every rank, naming it, instead
    of leaving the others waiting in a collective.
    """
    # imported here: asyncdiff.dist.worker pulls in the schedulers (diffusers), which
    # ``import asyncdiff`` should not pay for
    from asyncdiff.dist.worker import check_plan_hash

    rank, world = dist.get_rank(), dist.get_world_size()
    captured, form, error = None, None, None
    try:
        captured, form = capture()
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank
        error = f"{type(err).__name__}: {err}"
    errors: list[Any] = [None] * world
    dist.all_gather_object(errors, error)
    failed = {r: e for r, e in enumerate(errors) if e}
    if failed:
        raise RuntimeError(f"asyncdiff.parallelize: capture failed on rank(s) {sorted(failed)}: "
                           f"{next(iter(failed.values()))}")
    shared: list[Any] = [None]
    if rank == 0:
        try:
            shared = [{"plan": compile_call(module, call, captured, opts).plan.to_json()}]
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            shared = [{"error": f"{type(err).__name__}: {err}"}]
    dist.broadcast_object_list(shared, src=0)
    if "error" in shared[0]:
        raise RuntimeError(f"asyncdiff.parallelize: planning failed on rank 0: "
                           f"{shared[0]['error']}")
    plan = Plan.from_json(shared[0]["plan"])
    check_plan_hash(plan, rank, world)
    staged = stages_from_plan(build_graph(captured, NodeCosts({}, {}, {}), "flops"), plan)
    mine = tuple(staged.stage_parts(stage_of_device(rank, plan.n)))
    return Session(call.key, plan, form, staged.specs, staged.placeholders, staged.output,
                   segments=mine, rank=rank)
