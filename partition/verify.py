"""Never silently wrong: every compile checks its stages against the user's own model.

On the example inputs, at the planning thread count, the stages chained in order (every
prologue, then every segment: exactly what a warm-up step runs) must equal the eager model bit
for bit. That one comparison covers the whole compiler (capture, functionalization, staging,
conditioning replication and hoisting); it costs one run of the stages, and the eager output is
the one the time cost model already produced while timing the modules (``partition/timing.py``),
so with ``cost_model=time`` verification adds a single forward. With ``cost_model=time`` the
stages and the sequential step (the graph as one stage) are then timed side by side
(:func:`time_step`): the plan's measured stage times are the real stages', conditioning
included, and its sequential step is timed the same way.

When they differ the compile is refused with :class:`VerificationError`, unless eager itself
took another kernel path: ``nn.MultiheadAttention`` (and a few other modules) switch to a fused
"fast path" under ``no_grad`` that ``torch.export`` does not capture; the captured graph equals
eager run with autograd enabled. Then the compile goes on and says so, with the size of the
difference, in ``Plan.verification`` and in the plan table. Otherwise the error localises the
divergence: whether the capture or the staging differs, and in the latter case the first node
(in execution order) whose value in the stages differs from the captured graph's, with its
stage, module and the largest absolute difference.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import fx

from partition.cost import node_module
from partition.graph import TrunkGraph
from partition.stages import StagedModel
from partition.threads import intra_op_threads

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """The stages of a plan do not compute the model; names where and by how much."""


@dataclass(frozen=True)
class Verified:
    note: str                       # what the plan records (``Plan.verification``)
    stage_ms: tuple[float, ...] | None  # each stage's time (time_step; None: not timed)
    step_ms: float | None = None    # the sequential step, timed the same way


def verify(graph: TrunkGraph, staged: StagedModel, inputs: dict[str, torch.Tensor], *,
           threads: int | None, model: str = "model") -> Verified:
    """Check stages == eager on ``inputs``; raise :class:`VerificationError` if they differ.
    With measured module times (``cost_model=time``) the stages and the sequential step are
    then timed (:func:`time_step`), where the inputs are; if the modules were timed on another
    device (``compile_model(device=…)``), the plan keeps the module times of that device."""
    with intra_op_threads(threads), torch.no_grad():
        eager = reference(graph, inputs, threads)
        env = graph.captured.env(inputs)
        out = run_stages(staged, env)
        if same(out, eager):
            captured = graph.costs.captured
            note = "exact: stages == eager"
            if captured is not None and same(captured, eager):
                note += " == captured"
            note += f" (bit for bit, {torch.get_num_threads()} thread(s))"
        else:  # raises, unless eager took a kernel path the capture does not have
            note = _explain(graph, staged, inputs, out, eager, model)
        stage_ms = step_ms = None
        here = next(iter(inputs.values())).device.type
        if graph.costs.ms and torch.device(graph.costs.device).type == here:
            one = None if staged.n == 1 else sequential_step(graph, env, out)
            stage_ms, step_ms = time_step(staged, env, one, graph.costs.repeats)
        return Verified(note, stage_ms, step_ms)


def reference(graph: TrunkGraph, inputs: dict[str, torch.Tensor], threads: int | None) -> torch.Tensor:
    """The eager model's output at this thread count: the one the cost pass computed when it
    timed the model with the same threads on the same device, else one eager forward."""
    costs = graph.costs
    here = next(iter(inputs.values())).device
    if costs.eager is not None and costs.threads == torch.get_num_threads() \
            and costs.eager.device == here:
        return costs.eager
    out = graph.captured.eager(inputs)
    costs.eager, costs.threads = out, torch.get_num_threads()
    return out


def run_stages(staged: StagedModel, env: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stages chained in order: every prologue, then every segment (a warm-up step)."""
    env = dict(env)
    for seg in [*staged.prologues, *staged.segments]:
        env.update(seg(env))
    return env[staged.output]


def sequential_step(graph: TrunkGraph, env: dict[str, torch.Tensor], want: torch.Tensor):
    """One step of the sequential sampler in the form the stages run: the graph as one stage,
    every node once, its hoisted conditioning computed beforehand, once per run
    (``asyncdiff.denoiser.SequentialDenoiser`` on an N = 1 split). Run once untimed, and
    checked against ``want`` (the stages' output): what is timed is the same computation."""
    from partition.stages import build_stages
    from partition.strategies.base import Assignment

    one = build_stages(graph, Assignment((0,) * graph.size, 1, "whole"))
    base = dict(env)
    for seg in one.prologues:
        base.update(seg(base))

    def step() -> torch.Tensor:
        run = dict(base)
        for seg in one.segments:
            run.update(seg(run))
        return run[one.output]
    got = step()
    if not same(got, want):
        raise VerificationError(f"the graph as one stage differs from the plan's stages by "
                                f"{max_diff(got, want):.3g} (max abs): one of the two "
                                "stagings is wrong")
    return step


def time_step(staged: StagedModel, env: dict[str, torch.Tensor], sequential, repeats: int = 1
              ) -> tuple[tuple[float, ...], float]:
    """Each stage's per-step wall time and the ``sequential`` step's, in ms, timed the same
    way (no hooks; CUDA synchronised), alternating, the minimum of ``repeats`` (at least 1)
    runs each, after one untimed run of each. A prologue (conditioning hoisted to once per
    sampling run) is not counted. ``sequential=None``: the stages are the whole model
    (N = 1), and the sequential step is their sum, not a second noisy timing of the same work.

    A predicted speedup divides the sequential step by the stage times, so both must come from
    one harness: the cost pass's per-node times, summed, include every node's timing overhead
    (on a model of a few ms the sum is about twice its forward), and a speedup predicted
    against that sum came out above the ideal. (A run's measured baseline chains the N stages,
    ``SequentialDenoiser(staged)``, and so also repeats the per-step conditioning each stage
    replicates, ``StagePlan.cond_flops``; the prediction's sequential step does not.)"""
    cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in env.values())

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    stage = [float("inf")] * staged.n
    step = float("inf")
    for _ in range(max(int(repeats), 1)):
        if sequential is not None:
            t0 = clock()
            sequential()
            step = min(step, (clock() - t0) * 1e3)
        run = dict(env)
        ms = [0.0] * staged.n
        for seg in [*staged.prologues, *staged.segments]:
            t0 = clock()
            run.update(seg(run))
            if not seg.prologue:
                ms[seg.stage] += (clock() - t0) * 1e3
        stage = [min(a, b) for a, b in zip(stage, ms)]
    if sequential is None:
        step = sum(stage)
    return tuple(round(t, 4) for t in stage), round(step, 4)


def same(a, b) -> bool:
    """Bit for bit (NaNs with the same bits are the same; -0.0 is not 0.0)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape \
            or a.dtype != b.dtype:
        return False
    if torch.equal(a, b) and not a.is_floating_point():
        return True
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                       b.reshape(-1).contiguous().view(torch.uint8)) \
        if a.numel() else True


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _explain(graph: TrunkGraph, staged: StagedModel, inputs, out, eager, model: str) -> str:
    """Stages differ from eager: a known kernel-path difference (returns the note), or an
    error that says where."""
    captured = graph.captured(inputs)
    if not same(out, captured):
        raise VerificationError(_first_divergence(graph, staged, inputs, model,
                                                  max_diff(out, eager)))
    with_grad = _eager_with_grad(graph, inputs)
    d = max_diff(captured, eager)
    if same(captured, with_grad):
        note = (f"exact: stages == captured == eager with autograd enabled (bit for bit, "
                f"{torch.get_num_threads()} thread(s)); eager under no_grad differs by {d:.3g} "
                "(max abs): it takes a fused kernel path that torch.export does not capture "
                "(e.g. nn.MultiheadAttention's fast path)")
        log.warning("%s: %s", model, note)
        return note
    raise VerificationError(
        f"{model}: the captured graph differs from the eager model by {d:.3g} (max abs), also "
        f"with autograd enabled ({max_diff(captured, with_grad):.3g}): torch.export captured "
        "another computation than the model runs; the plan is refused. Check the model for "
        "state it reads or writes outside its inputs, or compile it with backend='module'")


def _eager_with_grad(graph: TrunkGraph, inputs) -> torch.Tensor:
    """Eager with autograd on and every floating parameter requiring grad (what turns the
    fused inference paths off), restored afterwards."""
    params = [p for p in graph.captured.model.parameters()
              if p.is_floating_point() and not p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            return graph.captured.eager(inputs).detach()
    finally:
        for p in params:
            p.requires_grad_(False)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op == "call_function":
            self.values[n.name] = _snapshot(out)
        return out


def _snapshot(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_snapshot(x) for x in v)
    return v


def _first_divergence(graph: TrunkGraph, staged: StagedModel, inputs, model: str,
                      total: float) -> str:
    """Re-run the captured graph and the stages recording every node (failure path only)."""
    gm = graph.captured.gm
    rec = _Recorder(gm)
    rec.run(*(inputs[s.name] for s in graph.captured.specs))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    env = graph.captured.env(inputs)
    diverged = []  # (captured order, stage, node, diff)
    for seg in [*staged.prologues, *staged.segments]:
        r = _Recorder(seg.gm)
        out = r.run(*(env[k] for k in seg.inputs))
        env.update(out)
        for name, value in r.values.items():
            want = rec.values.get(name)
            d = _diff(value, want)
            if d:
                diverged.append((order[name], seg.stage, name, d))
    if not diverged:
        return (f"{model}: the stages differ from the captured graph by {total:.3g} (max abs) "
                "although every node of every stage matches it; the plan is refused")
    _, stage, name, d = min(diverged)
    node = nodes[name]
    return (f"{model}: the stages differ from the eager model by {total:.3g} (max abs); the "
            f"first diverging value is node {name!r} ({node.target}) of stage {stage}, in "
            f"module '{node_module(node) or '<root>'}', off by {d:.3g}: the staged graph does "
            "not compute what the captured graph computes; the plan is refused")


def _diff(a, b) -> float:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return 0.0 if same(a, b) else max_diff(a, b) or float("nan")
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return max((_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0
