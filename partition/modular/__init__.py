"""The module backend: for networks torch.export cannot capture (docs/design.md §1).

Stages are sets of the network's own blocks (``blocks.py``), run eagerly with a block owned
elsewhere answered by the value its owner produced (``segment.py``). The same strategies cut
them (balanced on measured per-block FLOPs or time, equal blocks, manual boundaries), the same
verification checks them (stages chained == eager, bit for bit), and the same Plan describes
them, with ``backend="module"`` and what this backend costs: the glue runs on every device, and
a block's outputs go to every later stage (no graph says which of them it reads).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from partition.backend import Compiled
from partition.contract import DenoiserContract
from partition.modular.blocks import BlockGraph, choose_units, mark_trunk, trace_calls
from partition.modular.plan import make_module_plan
from partition.modular.segment import OUTPUT, BlockSegment, UnitInfo
from partition.stages import StagedModel
from partition.strategies.balanced import min_max_cuts
from partition.strategies.base import Assignment, PartitionRequest, RequestError
from partition.threads import intra_op_threads

STRATEGIES: tuple[str, ...] = ("balanced", "equal_blocks", "manual")
COST_MODELS: tuple[str, ...] = ("flops", "time")

__all__ = ["BlockGraph", "BlockSegment", "ModuleBackend", "compile_modular",
           "stages_from_plan"]


def block_graph(model, specs, inputs, n: int, *, cost_model: str = "flops", repeats: int = 3,
                threads: int | None = 1, contract: DenoiserContract | None = None,
                blocks: tuple[str, ...] | None = None) -> BlockGraph:
    """Trace the eager model, tell trunk from glue, cost every call and choose the units
    (``blocks``: take these calls, by name, as a saved plan lists them)."""
    if cost_model not in COST_MODELS:
        raise RequestError(f"cost_model={cost_model!r}: not available with the module backend; "
                         f"allowed: {', '.join(COST_MODELS)}")
    contract = contract or DenoiserContract()
    with intra_op_threads(threads) as used:
        calls, out, total = trace_calls(model, specs, inputs, contract, count_flops=True)
        mark_trunk(model, specs, inputs, contract, calls)
        if cost_model == "time":
            runs = [trace_calls(model, specs, inputs, contract, count_flops=False)[0]
                    for _ in range(max(repeats, 1))]
            for i, c in enumerate(calls):
                c.ms = float(np.median([r[i].ms for r in runs]))

    def weight(c) -> float:
        return float(c.flops if cost_model == "flops" else c.ms)

    if blocks is not None:
        by_name = {c.name: i for i, c in enumerate(calls)}
        missing = [b for b in blocks if b not in by_name]
        if missing:
            raise ValueError(f"plan blocks {missing} are not calls of this model's forward: "
                             "the plan was made for another model or shape")
        units = [by_name[b] for b in blocks]
    else:
        units = choose_units(calls, n, weight)
    if not units:
        raise RequestError("module backend: no module's output depends on the latent; the "
                         "network has no blocks to place on stages")
    root = next(c for c in calls if c.parent is None)
    w = np.array([weight(calls[i]) for i in units])
    return BlockGraph(model=model, specs=tuple(specs), contract=contract, calls=calls,
                      units=units, weights=w, glue_cost=max(weight(root) - float(w.sum()), 0.0),
                      total_flops=total,
                      glue_flops=max(total - sum(calls[i].flops for i in units), 0),
                      cost_model=cost_model, threads=used, ms_measured=cost_model == "time",
                      output=out)


def assign(graph: BlockGraph, request: PartitionRequest, strategy: str) -> Assignment:
    """Contiguous stages of units (every boundary between two units is a candidate cut)."""
    n, k = request.n, graph.size
    if strategy not in STRATEGIES:
        raise RequestError(f"strategy={strategy!r}: not available with the module backend; "
                         f"allowed: {', '.join(STRATEGIES)}")
    if n > k:
        raise RequestError(f"n={n} stages but the module backend found {k} blocks; allowed: "
                         f"n <= {k}")
    if n == 1:
        return Assignment((0,) * k, 1, strategy)
    if strategy == "balanced":
        q = np.arange(k + 1)
        prefix = np.concatenate([[0.0], np.cumsum(graph.weights)])
        cost = np.triu(prefix[None, :] - prefix[:, None], 1)
        cuts = min_max_cuts(cost, q, n)
    elif strategy == "equal_blocks":
        cuts = [round(j * k / n) for j in range(1, n)]
    else:
        cuts = _manual(graph, request)
    return Assignment.from_cuts(sorted(cuts), k, strategy)


def _manual(graph: BlockGraph, request: PartitionRequest) -> list[int]:
    bounds = request.options.get("boundaries")
    if bounds is None or len(bounds) != request.n - 1:
        raise RequestError("manual split with the module backend: give boundaries (exactly n-1 "
                         "module paths); 'stages' lists need the graph backend")
    cuts = []
    for path in bounds:
        hit = next((i for i, m in enumerate(graph.modules)
                    if m == path or m.startswith(path + ".")), None)
        if hit is None or hit == 0:
            raise RequestError(f"boundaries: {path!r} is not a block of the module backend after "
                             f"its first; blocks: {', '.join(graph.modules)}")
        cuts.append(hit)
    if cuts != sorted(set(cuts)):
        raise RequestError(f"boundaries: {bounds} must be strictly increasing in execution order")
    return cuts


def build_block_stages(graph: BlockGraph, a: Assignment, runner=None) -> StagedModel:
    infos = []
    for i in range(graph.size):
        u = graph.unit(i)
        names = tuple(f"{u.name}.{j}" if isinstance(v, torch.Tensor) else None
                      for j, v in enumerate(u.leaves))
        consts = tuple(None if isinstance(v, torch.Tensor) else v for v in u.leaves)
        infos.append(UnitInfo(u.path, u.index, a.stage_of[i], names, consts, u.spec,
                              graph.inside(i)))
    segments = [BlockSegment(stage=s, start=start, stop=stop, model=graph.model,
                             units=tuple(infos), specs=graph.specs, contract=graph.contract,
                             last=s == a.n - 1, runner=runner, calls=graph.call_counts())
                for s, start, stop in a.segments()]
    return StagedModel(segments=segments, output=OUTPUT, n=a.n, specs=graph.specs,
                       placeholders={s.name: s.name for s in graph.specs})


def compile_modular(model, specs, inputs, request: PartitionRequest, *, strategy: str = "balanced",
                    cost_model: str = "flops", name: str = "model", config_hash: str = "",
                    repeats: int = 3, threads: int | None = 1,
                    contract: DenoiserContract | None = None, verify: bool = True,
                    note: str = "", runner=None) -> Compiled:
    graph = block_graph(model, specs, inputs, request.n, cost_model=cost_model, repeats=repeats,
                        threads=threads, contract=contract)
    checked, stage_ms, step_ms = "off: not verified (verify=False)", None, None
    refined = None
    if verify and graph.ms_measured and request.refine and request.n > 1:
        refined = _refined(graph, request, strategy, inputs, threads, name, repeats, runner)
        graph = dataclasses.replace(graph, weights=refined.weights)
        a, staged, v = refined.assignment, refined.staged, refined.verified
        checked, stage_ms, step_ms = v.note, v.stage_ms, v.step_ms
    else:
        a = assign(graph, request, strategy)
        staged = build_block_stages(graph, a, runner)
        if verify:
            checked, stage_ms, step_ms = verify_blocks(graph, staged, inputs, threads, name,
                                                       repeats)
    plan = make_module_plan(graph, a, staged, model=name, config_hash=config_hash,
                            depth=request.depth, verification=checked, stage_ms=stage_ms,
                            step_ms=step_ms, repeats=repeats, note=note, refined=refined)
    return Compiled(plan=plan, staged=staged, graph=graph)


def _refined(graph: BlockGraph, request, strategy, inputs, threads, name, repeats, runner):
    """The stage-level refinement ([Note: refinement]) on the module backend's blocks."""
    from partition.refine import refine
    from partition.verify import Verified

    def weighted(w):
        return dataclasses.replace(graph, weights=w)

    def measure(staged):
        return Verified(*verify_blocks(graph, staged, inputs, threads, name, repeats))

    def predict(a, w):
        so = np.asarray(a.stage_of)
        return np.array([w[so == s].sum() + graph.glue_cost for s in range(a.n)])

    return refine(graph.weights, cut=lambda w: assign(weighted(w), request, strategy),
                  predict=predict, build=lambda a: build_block_stages(graph, a, runner),
                  measure=measure, rounds=request.refine, target=request.target)


def verify_blocks(graph: BlockGraph, staged: StagedModel, inputs, threads, name: str,
                  repeats: int = 1):
    """Stages chained (a warm-up step) == the eager model, bit for bit; with measured block
    times, that run timed stage by stage (``partition.verify.run_timed``; ``repeats`` > 1:
    each stage timed that many times, interleaved, the median kept). The sequential step is
    the stages' sum less the glue every stage runs beyond the first."""
    from partition.spec import call_denoiser
    from partition.verify import (VerificationError, max_diff, retime, run_timed, same,
                                  stage_clock)

    with intra_op_threads(threads) as used, torch.no_grad():
        want = call_denoiser(graph.model, inputs, graph.contract, graph.specs)
        env = {s.name: inputs[s.name] for s in graph.specs}
        cuda = want.is_cuda
        clock = stage_clock(used, cuda) if graph.ms_measured else None
        got, stage_ms, full = run_timed(staged, env, clock)
        if not same(got, want):
            raise VerificationError(
                f"{name}: the module backend's stages differ from the eager model by "
                f"{max_diff(got, want):.3g} (max abs): the network's blocks do not compose the "
                "way its forward calls them (a block whose output is consumed inside another "
                "block, or state kept between calls); the plan is refused")
        if clock is None:
            return f"exact: stages == eager (bit for bit, {used} thread(s))", None, None
        stage_ms, _ = retime(staged, full, stage_ms, repeats, clock)
        step_ms = max(sum(stage_ms) - (staged.n - 1) * graph.glue_cost, 0.0)
    return f"exact: stages == eager (bit for bit, {used} thread(s))", stage_ms, step_ms


def graph_for_plan(model, specs, inputs, plan, contract=None, threads: int | None = 1) -> BlockGraph:
    """The blocks a saved module-backend plan names, from a fresh trace of the same model
    (every rank of a torchrun job: rank 0 chose them)."""
    return block_graph(model, specs, inputs, plan.n, threads=threads, contract=contract,
                       blocks=plan.blocks)


def stages_from_plan(graph: BlockGraph, plan, runner=None) -> StagedModel:
    """The stages of a saved module-backend plan on a graph of the same blocks."""
    if graph.graph_hash() != plan.graph_hash:
        raise ValueError(f"plan graph_hash={plan.graph_hash} but this trace is "
                         f"{graph.graph_hash()}: the plan was made for another model or shape")
    return build_block_stages(graph, plan.assignment(), runner)


class ModuleBackend:
    """:class:`partition.backend.Backend` over the network's own blocks, run eagerly."""

    def compile(self, model, specs, inputs, request: PartitionRequest, *, strategy: str,
                cost_model: str, name: str, config_hash: str, repeats: int,
                threads: int | None, captured=None, costs=None, device=None,
                contract=None, verify: bool = True, runner=None,
                note: str = "") -> Compiled:
        return compile_modular(model, specs, inputs, request, strategy=strategy,
                               cost_model=cost_model, name=name, config_hash=config_hash,
                               repeats=repeats, threads=threads, contract=contract,
                               verify=verify, note=note, runner=runner)

    def rebuild(self, model, specs, inputs, plan, *, captured=None, contract=None,
                threads: int | None = 1, runner=None) -> tuple[BlockGraph, StagedModel]:
        graph = graph_for_plan(model, specs, inputs, plan, contract, threads)
        return graph, stages_from_plan(graph, plan, runner)

    def stages(self, graph: BlockGraph, plan, runner=None) -> StagedModel:
        return stages_from_plan(graph, plan, runner)

    def verify(self, graph: BlockGraph, staged: StagedModel, inputs, threads: int | None,
               name: str) -> str:
        return verify_blocks(graph, staged, inputs, threads, name)[0]
