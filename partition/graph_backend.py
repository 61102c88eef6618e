"""The graph backend: torch.export's graph, costed per node, cut into stages that hold only
their own weights (``partition/stages.py``), verified against the eager model."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from partition.backend import Compiled
from partition.capture import Captured, capture
from partition.contract import DenoiserContract
from partition.cost import NodeCosts, profile
from partition.graph import TrunkGraph, build_graph
from partition.plan import Measured, Plan, make_plan
from partition.refine import refine
from partition.stages import Hoisted, StagedModel, build_stages
from partition.strategies.base import Assignment, PartitionRequest, RequestError
from partition.strategies.registry import get_strategy
from partition.verify import Verified, times_here
from partition.verify import verify as verify_stages


class GraphBackend:
    """:class:`partition.backend.Backend` over a torch.export capture."""

    def compile(self, model, specs, inputs, request: PartitionRequest, *, strategy: str,
                cost_model: str, name: str, config_hash: str, repeats: int,
                threads: int | None, captured: Captured | None, costs: NodeCosts | None,
                device: str | None, contract, verify: bool, runner=None,
                note: str = "") -> Compiled:
        if captured is None:
            captured = capture(model, specs, inputs, contract or DenoiserContract())
        if costs is None:
            costs = profile(captured, inputs, repeats=repeats if cost_model == "time" else 0,
                            threads=threads,
                            fvcore_model=model if cost_model == "fvcore" else None,
                            device=device)
        graph = build_graph(captured, costs, cost_model)
        return compile_graph(graph, request, strategy=strategy, cost_model=cost_model,
                             name=name, config_hash=config_hash,
                             inputs=inputs if verify else None, threads=threads,
                             verify=verify)

    def rebuild(self, model, specs, inputs, plan: Plan, *, captured: Captured | None,
                contract, threads: int | None, runner=None) -> tuple[TrunkGraph, StagedModel]:
        if captured is None:
            captured = capture(model, specs, inputs, contract or DenoiserContract())
        graph = build_graph(captured, NodeCosts({}, {}, {}), "flops")
        return graph, self.stages(graph, plan)

    def stages(self, graph: TrunkGraph, plan: Plan, runner=None) -> StagedModel:
        """The stages of a saved plan on a fresh capture of the same model and shapes."""
        got = graph.captured.graph_hash()
        if got != plan.graph_hash:
            raise ValueError(f"plan graph_hash={plan.graph_hash} but this capture is {got}: "
                             "the plan was made for another model, shape or library version")
        placement = tuple(Hoisted(h.name, None if h.home < 0 else h.home, h.consumers)
                          for h in plan.hoisted)
        return build_stages(graph, plan.assignment(), placement)

    def verify(self, graph: TrunkGraph, staged: StagedModel, inputs, threads: int | None,
               name: str) -> str:
        return verify_stages(graph, staged, inputs, threads=threads, model=name).note


def compile_graph(graph: TrunkGraph, request: PartitionRequest, *, strategy: str,
                  cost_model: str, name: str, config_hash: str,
                  inputs: dict[str, torch.Tensor] | None = None, threads: int | None = None,
                  verify: bool = True) -> Compiled:
    """Cut an already captured and costed graph; verified against the eager model when
    ``inputs`` are given (``verify=False`` or no inputs: the plan says it is unverified).
    With measured times (``cost_model=time``) the verified stages are timed, and with
    ``request.refine`` rounds the split is refined on those times ([Note: refinement])."""
    if request.n < 1:
        raise RequestError(f"n={request.n}; allowed: n >= 1")
    strategy_fn = get_strategy(strategy)

    def cut(g: TrunkGraph) -> Assignment:
        return Assignment((0,) * g.size, 1, strategy) if request.n == 1 else strategy_fn(g, request)

    def check(staged: StagedModel) -> Verified:
        return verify_stages(graph, staged, inputs, threads=threads, model=name,
                             repeats=graph.costs.repeats)

    timed = verify and inputs is not None and times_here(graph, inputs)
    if timed and request.refine and request.n > 1:
        def weighted(w: np.ndarray) -> TrunkGraph:
            return dataclasses.replace(graph, weights=w)

        refined = refine(graph.weights, cut=lambda w: cut(weighted(w)),
                         predict=lambda a, w: weighted(w).stage_costs(a.stage_of, a.n),
                         build=lambda a: build_stages(graph, a), measure=check,
                         rounds=request.refine, target=request.target)
        graph = weighted(refined.weights)
        assignment, staged, checked = refined.assignment, refined.staged, refined.verified
        extra = dict(predicted_ms=refined.predicted_ms, rounds=refined.rounds,
                     outcome=refined.outcome)
    else:
        assignment = cut(graph)
        staged = build_stages(graph, assignment)
        if not verify:
            checked = Verified("off: not verified (verify=False)", None)
        elif inputs is None:
            checked = Verified("off: not verified (no example inputs given to compile_graph)",
                               None)
        else:
            checked = check(staged)
        extra = dict(predicted_ms=tuple(round(float(x), 4) for x in
                                        graph.stage_costs(assignment.stage_of, assignment.n)))
    measured = None
    if checked.stage_ms is not None:
        costs = graph.costs
        measured = Measured(stage_ms=checked.stage_ms, total_ms=checked.step_ms,
                            threads=costs.threads, repeats=max(costs.repeats, 1),
                            device=costs.device, source="stages", step_source="stages",
                            clock=costs.clock, spread=checked.spread, **extra)
    plan = make_plan(graph, assignment, staged, model=name, config_hash=config_hash,
                     cost_model=cost_model, depth=request.depth, verification=checked.note,
                     measured=measured)
    return Compiled(plan=plan, staged=staged, graph=graph)
