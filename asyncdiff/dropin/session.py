"""One compiled denoiser per call shape, and the executor of one pipeline run on it.

``emulate``: the whole staged model in this process (:class:`asyncdiff.emulate.Emulator`).
``distributed``: every rank captures the denoiser (the stages are rebuilt from the capture),
rank 0 plans and broadcasts the plan JSON, and each rank keeps only its own stage's segments
(:func:`partition.stages_from_plan`), as ``experiments/run.py`` does under torchrun.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from asyncdiff.distributed import limits, liveness
from asyncdiff.distributed.executor import DistributedExecutor
from asyncdiff.distributed.sharing import on_every_rank, own_stage, plan_from_rank0
from asyncdiff.distributed.transport import TorchTransport
from asyncdiff.dropin.arguments import Partitioning
from asyncdiff.dropin.call import Call
from asyncdiff.dropin.lazy import UNVERIFIED, hollow, materialise
from asyncdiff.emulate import Emulator
from asyncdiff.lowering import checked_program, place
from asyncdiff.timeline import Timeline, stage_of_device
from partition import Compiled, PartitionRequest, Plan, compile_from_plan, compile_model
from partition.capture import Captured, capture
from partition.cost import NodeCosts, profile
from partition.plan import architecture_hash
from partition.stages import Segment, StagedModel


log = logging.getLogger(__name__)


def rank_in_pipeline(devices: int) -> tuple[int, int]:
    """(device in its pipeline, the global rank of the pipeline's device 0) of this rank, in
    pipelines of ``devices`` ranks."""
    rank = dist.get_rank()
    return rank % devices, rank - rank % devices


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
    rank: int = 0  # this process's device in its pipeline (distributed)
    base: int = 0  # the global rank of its pipeline's device 0 (0 but for CFG-parallel)
    state: str = ""  # the module's state_key when captured (asyncdiff/parallelize.py)
    hoist_inputs: tuple[str, ...] = ()  # model inputs every stage's prologues read
    group: Any = None  # distributed: the sampling loop's process group, bounded by step_s
    step_s: float | None = None

    def executor(self, timeline: Timeline, timesteps: Sequence[float], device: torch.device,
                 groups: int = 1):
        """The executor of one stream's run: the emulator, or this rank's lowered program
        (``groups`` 2: CFG-parallel, the ε halves swapped with the other group)."""
        if self.staged is not None:
            return Emulator(self.staged, self.plan, timeline, timesteps)
        rank = self.base + self.rank
        _agree(timeline, self.plan, groups)
        program = checked_program(timeline, self.plan, rank, groups=groups)
        return DistributedExecutor(list(self.segments), self.plan, timeline, timesteps,
                                   program, self.specs, self.placeholders,
                                   self.output, TorchTransport(rank, self.group, self.step_s),
                                   device,
                                   guidance=place(rank, timeline.devices, 2)[1]
                                   if groups == 2 else None, hoist_inputs=self.hoist_inputs)

    def tensors(self) -> list[torch.Tensor]:
        """The parameters and buffers this session's segments hold."""
        parts = self.segments if self.staged is None else \
            [*self.staged.segments, *self.staged.prologues]
        return [t for p in parts for t in p.tensors()]


def config_hash(module: nn.Module) -> str:
    """The architecture (:func:`partition.plan.architecture_hash`, as the command line
    records it), or the class alone for a model without a config."""
    return architecture_hash(module) or \
        hashlib.sha256(type(module).__qualname__.encode()).hexdigest()


def compile_call(module: nn.Module, call: Call, captured: Captured | None, part: Partitioning,
                 runner=None, note: str = "", costs: NodeCosts | None = None) -> Compiled:
    """Plan the call into ``part.n`` stages (the one place a plan is made): on its capture,
    or with the module backend where there is none; or rebuild a saved plan's stages.
    ``costs``: the capture's, already counted (a lazily loaded denoiser's, over fake
    tensors only)."""
    if part.plan is not None:
        return compile_from_plan(module, call.specs(), call.tensors, part.plan,
                                 captured=captured, threads=torch.get_num_threads(),
                                 verify=part.verify, runner=runner,
                                 name=type(module).__name__)
    return compile_model(module, call.specs(), call.tensors,
                         PartitionRequest(n=part.n, depth=part.depth, slack=part.slack,
                                          options=dict(part.manual), target=part.target,
                                          deepen=part.deepen, refine=part.refine),
                         strategy=part.strategy, cost_model=part.cost_model,
                         name=type(module).__name__, config_hash=config_hash(module),
                         repeats=1 if part.cost_model == "time" else 0,
                         threads=torch.get_num_threads(), captured=captured, costs=costs,
                         verify=part.verify, runner=runner, note=note,
                         backend="module" if captured is None else "graph")


def emulated(module: nn.Module, call: Call, captured: tuple[Captured | None, str],
             part: Partitioning, runner=None) -> Session:
    """``captured``: what :func:`partition.capture_or_fallback` returned."""
    compiled = compile_call(module, call, captured[0], part, runner, captured[1])
    staged = compiled.staged
    return Session(call.key, compiled.plan, None, staged.specs, staged.placeholders,
                   staged.output, staged=staged)


def distributed(module: nn.Module, call: Call,
                capture: Callable[[], tuple[Captured | None, str]], part: Partitioning,
                devices: int, step_timeout_s: float | None, runner=None) -> Session:
    """Every rank captures (or traces, for the module backend); rank 0 plans and broadcasts;
    each rank keeps its own stage (``asyncdiff/distributed/sharing.py``: a failure on any rank is
    raised on every rank). ``devices``: of one pipeline; ``step_timeout_s``: the loop's waits
    (None: derived from the plan)."""
    rank, base = rank_in_pipeline(devices)
    captured, fallback = on_every_rank(capture, "asyncdiff.parallelize: capture")
    plan = plan_from_rank0(lambda: compile_call(module, call, captured, part, runner,
                                                fallback).plan,
                           "asyncdiff.parallelize: planning")
    mine = on_every_rank(lambda: own_stage(plan, captured, module, call.specs(), call.tensors,
                                           None, stage_of_device(rank, plan.n),
                                           torch.get_num_threads(), runner),
                         "asyncdiff.parallelize: building this rank's stage")
    specs = tuple(call.specs())
    placeholders = captured.placeholders if captured is not None and plan.backend == "graph" \
        else {s.name: s.name for s in specs}
    return Session(call.key, plan, None, specs, placeholders, plan.output,
                   segments=tuple(mine.parts), rank=rank, base=base,
                   hoist_inputs=mine.hoist_inputs,
                   **_loop_group(plan, step_timeout_s, call.tensors[call.latent].device))


def distributed_lazy(module: nn.Module, call: Call, part: Partitioning, devices: int,
                     step_timeout_s: float | None, checkpoint) -> Session:
    """:func:`distributed` for a denoiser on the meta device (``asyncdiff/dropin/lazy.py``):
    every rank gives it hollow storage and captures it (the graph a whole load captures),
    rank 0 costs it by FLOPs over fake tensors and plans, and each rank reads only its own
    stage's tensors from ``checkpoint``. Unverified: no process holds the whole denoiser (the
    plan and a warning say so)."""
    (rank, base), device = rank_in_pipeline(devices), call.tensors[call.latent].device
    hollows = hollow(module, device, checkpoint)
    captured: Captured = on_every_rank(lambda: capture(module, call.specs(), call.tensors),
                                       "asyncdiff.parallelize: capture")

    def make() -> Plan:
        costs = profile(captured, call.tensors, repeats=0, fake_only=True)  # never the values
        return compile_call(module, call, captured, dataclasses.replace(part, verify=False),
                            costs=costs).plan

    plan = dataclasses.replace(plan_from_rank0(make, "asyncdiff.parallelize: planning"),
                               verification=UNVERIFIED)
    if rank + base == 0:
        log.warning("%s: %s", type(module).__name__, UNVERIFIED)
    own = on_every_rank(lambda: own_stage(plan, captured, module, call.specs(), call.tensors,
                                          None, stage_of_device(rank, plan.n),
                                          torch.get_num_threads()),
                        "asyncdiff.parallelize: building this rank's stage")
    mine = on_every_rank(lambda: materialise(own.parts, checkpoint, hollows, device),
                         "asyncdiff.parallelize: loading this rank's stage")
    return Session(call.key, plan, None, tuple(call.specs()), captured.placeholders,
                   plan.output, segments=tuple(mine), rank=rank, base=base,
                   hoist_inputs=own.hoist_inputs, **_loop_group(plan, step_timeout_s, device))


def _agree(timeline: Timeline, plan: Plan, groups: int) -> None:
    """Every rank runs this stream on the same plan and schedule (each builds its timeline
    from its own pipeline call: a rank called with other steps or options would post another
    program)."""
    t = timeline
    mine = (f"plan {plan.plan_hash}, N={t.n} S={t.stride} W={t.warmup} T={t.steps} "
            f"C={t.cooldown} sync={list(t.sync)} time_shift={t.time_shift} "
            f"stride_noise={t.stride_noise} groups={groups}")
    every = liveness.exchange("a stream's schedule", mine)
    bad = [r for r, e in enumerate(every) if e != every[0]]
    if bad:
        raise RuntimeError(f"asyncdiff.parallelize: ranks {bad} run {every[bad[0]]}, rank 0 "
                           f"{every[0]}: every rank must make the same pipeline calls (SPMD: "
                           "the same steps, inputs and options)")


def _loop_group(plan: Plan, step_timeout_s: float | None, device: torch.device) -> dict:
    """The group the session's rounds communicate in, and its step limit (``step_timeout_s``,
    else derived from the plan: ``asyncdiff/distributed/limits.py``)."""
    step_s = step_timeout_s if step_timeout_s is not None else limits.derive(plan, 1).step_s
    return {"group": liveness.loop_group(step_s, device), "step_s": step_s}
