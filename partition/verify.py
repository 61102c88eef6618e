"""Never silently wrong: every compile checks its stages against the user's own model.

On the example inputs, at the planning thread count, the stages chained in order (every
prologue, then every segment: exactly what a warm-up step runs) must equal the eager model bit
for bit. That one comparison covers the whole compiler (capture, functionalization, staging,
conditioning replication and hoisting); it costs one run of the stages, and the eager output is
the one the time cost model already produced while timing the modules (``partition/timing.py``),
so with ``cost_model=time`` verification adds a single forward. With ``cost_model=time`` that
run is also the stages' timing: each segment is timed as it runs (on the clock of [Note: the
CPU clock]), so the plan's stage times are the real stages', conditioning included, and the
refinement (``partition/refine.py``) corrects the cost model from them. ``repeats`` > 1 times
every stage again from the values that run computed, interleaved, and keeps the median.

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
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from partition.cost import node_module
from partition.graph import TrunkGraph
from partition.stages import StagedModel
from partition.threads import intra_op_threads
from partition.timing import host_clock

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """The stages of a plan do not compute the model; names where and by how much."""


@dataclass(frozen=True)
class Verified:
    note: str                       # what the plan records (``Plan.verification``)
    stage_ms: tuple[float, ...] | None  # each stage's time (None: not timed)
    step_ms: float | None = None    # the sequential step: the stages' times less the
    #                                 conditioning they replicate (:func:`sequential_ms`)
    spread: float | None = None     # largest relative difference between timings of a stage


def verify(graph: TrunkGraph, staged: StagedModel, inputs: dict[str, torch.Tensor], *,
           threads: int | None, model: str = "model", repeats: int = 1) -> Verified:
    """Check stages == eager on ``inputs``; raise :class:`VerificationError` if they differ.
    With measured module times (``cost_model=time``) the run that is checked is timed stage
    by stage (``repeats`` > 1: each stage timed that many times in all, the median kept),
    where the inputs are; if the modules were timed on another device
    (``compile_model(device=…)``), the plan keeps the module times of that device."""
    here = next(iter(inputs.values())).device.type
    timed = times_here(graph, inputs)
    with intra_op_threads(threads) as used, torch.no_grad():
        eager = reference(graph, inputs, threads)
        env = graph.captured.env(inputs)
        clock = stage_clock(used, here == "cuda") if timed else None
        out, stage_ms, full = run_timed(staged, env, clock)
        if same(out, eager):
            captured = graph.costs.captured
            note = "exact: stages == eager"
            if captured is not None and same(captured, eager):
                note += " == captured"
            note += f" (bit for bit, {torch.get_num_threads()} thread(s))"
        else:  # raises, unless eager took a kernel path the capture does not have
            note = _explain(graph, staged, inputs, out, eager, model)
        if not timed:
            return Verified(note, None)
        stage_ms, spread = retime(staged, full, stage_ms, repeats, clock)
        return Verified(note, stage_ms, sequential_ms(graph, staged, stage_ms), spread)


def times_here(graph: TrunkGraph, inputs: dict[str, torch.Tensor]) -> bool:
    """Whether verifying on ``inputs`` also times the stages: the cost model measured times
    (``cost_model=time``) on the device the inputs are on."""
    here = next(iter(inputs.values())).device.type
    return bool(graph.costs.ms) and torch.device(graph.costs.device).type == here


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
    return run_timed(staged, env)[0]


def stage_clock(threads: int, cuda: bool) -> Callable[[], float]:
    """Seconds, for timing a segment: on CUDA the wall clock after a synchronisation (the
    segment's kernels are done), on the host :func:`partition.timing.host_clock`."""
    if not cuda:
        return host_clock(threads)

    def clock() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()
    return clock


def run_timed(staged: StagedModel, env: dict[str, torch.Tensor], clock=None
              ) -> tuple[torch.Tensor, tuple[float, ...], dict[str, torch.Tensor]]:
    """The stages chained in order (every prologue, then every segment), each segment timed
    with ``clock`` (None: not timed) and its time added to its stage's, in ms; the prologues
    (conditioning hoisted to once per sampling run) are not counted. Returns the output, the
    stage times and every value the run computed."""
    env = dict(env)
    ms = [0.0] * staged.n
    for seg in staged.prologues:
        env.update(seg(env))
    for seg in staged.segments:
        if clock is None:
            env.update(seg(env))
            continue
        t0 = clock()
        env.update(seg(env))
        ms[seg.stage] += (clock() - t0) * 1e3
    return env[staged.output], tuple(ms), env


def retime(staged: StagedModel, full: dict[str, torch.Tensor], first: tuple[float, ...],
           repeats: int, clock) -> tuple[tuple[float, ...], float | None]:
    """Each stage's time as the median of ``first`` (the chained run's) and ``repeats - 1``
    more runs of it on the values ``full`` holds, interleaved (every stage once per pass, the
    order reversed every other pass: a slow moment hits different stages each time); and the
    largest relative difference between two timings of one stage (None: timed once)."""
    runs = [list(first)]
    for r in range(max(int(repeats), 1) - 1):
        ms = [0.0] * staged.n
        order = range(staged.n) if r % 2 else reversed(range(staged.n))
        for s in order:
            local = dict(full)
            t0 = clock()
            for seg in staged.stage_segments(s):
                local.update(seg(local))
            ms[s] = (clock() - t0) * 1e3
        runs.append(ms)
    median = tuple(round(statistics.median(r[s] for r in runs), 4) for s in range(staged.n))
    if len(runs) == 1:
        return median, None
    spread = max((max(r[s] for r in runs) - min(r[s] for r in runs)) / median[s]
                 for s in range(staged.n) if median[s] > 0)
    return median, round(spread, 4)


def sequential_ms(graph: TrunkGraph, staged: StagedModel, stage_ms) -> float:
    """The sequential step from the stages' own times: their sum, less what the stages
    recompute that one model computes once, the per-step conditioning several of them
    replicate (each node's share of that, from the cost model's time of it). A predicted
    speedup divides this by the stage times, so both come from one timing of one harness
    (the summed module times are not that harness: on a model of a few ms their timing
    overhead doubled the forward, and a predicted speedup came out above the ideal)."""
    counts: dict[str, int] = {}
    for seg in staged.segments:
        for c in set(seg.conditioning):
            counts[c] = counts.get(c, 0) + 1
    ms = graph.costs.ms
    extra = sum(ms.get(c, 0.0) * (k - 1) for c, k in counts.items() if k > 1)
    return round(max(sum(stage_ms) - extra, 0.0), 4)


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
