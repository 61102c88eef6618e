"""The compiler in one call: capture → cost → graph → strategy → stages → plan."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from partition.capture import Captured, capture
from partition.cost import COST_MODELS, NodeCosts, profile
from partition.graph import TrunkGraph, build_graph
from partition.plan import Plan, make_plan
from partition.spec import InputSpec
from partition.stages import StagedModel, build_stages
from partition.strategies.balanced import balanced, equal_blocks
from partition.strategies.base import Assignment, Partitioner, PartitionRequest
from partition.strategies.manual import manual
from partition.strategies.shell import shell_core

STRATEGIES: dict[str, Partitioner] = {
    "balanced": balanced,
    "equal_blocks": equal_blocks,
    "manual": manual,
    "shell_core": shell_core,
}


@dataclass
class Compiled:
    plan: Plan
    staged: StagedModel
    graph: TrunkGraph


def get_strategy(name: str) -> Partitioner:
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r}; allowed: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def compile_model(model: nn.Module, specs: tuple[InputSpec, ...], inputs: dict[str, torch.Tensor],
                  request: PartitionRequest, *, strategy: str = "balanced",
                  cost_model: str = "time", name: str = "model", config_hash: str = "",
                  repeats: int = 3, threads: int | None = 1, captured: Captured | None = None,
                  costs: NodeCosts | None = None, device: str | None = None) -> Compiled:
    """Plan ``model`` into ``request.n`` stages; pass ``captured``/``costs`` to reuse them.
    ``device``: where the time cost model times the nodes (default: where ``inputs`` are)."""
    if cost_model not in COST_MODELS:
        raise ValueError(f"cost_model={cost_model!r}; allowed: {', '.join(COST_MODELS)}")
    get_strategy(strategy)
    captured = captured or capture(model, specs, inputs)
    if costs is None:
        costs = profile(captured, inputs, repeats=repeats if cost_model == "time" or repeats else 0,
                        threads=threads, fvcore_model=model if cost_model == "fvcore" else None,
                        device=device)
    graph = build_graph(captured, costs, cost_model)
    return compile_graph(graph, request, strategy=strategy, cost_model=cost_model, name=name,
                         config_hash=config_hash)


def compile_graph(graph: TrunkGraph, request: PartitionRequest, *, strategy: str,
                  cost_model: str, name: str, config_hash: str) -> Compiled:
    if request.n < 1:
        raise ValueError(f"n={request.n}; allowed: n >= 1")
    assignment = (Assignment((0,) * graph.size, 1, strategy) if request.n == 1
                  else get_strategy(strategy)(graph, request))
    staged = build_stages(graph, assignment)
    plan = make_plan(graph, assignment, staged, model=name, config_hash=config_hash,
                     cost_model=cost_model, depth=request.depth)
    return Compiled(plan=plan, staged=staged, graph=graph)


def stages_from_plan(graph: TrunkGraph, plan: Plan) -> StagedModel:
    """Rebuild the stages of a saved plan from a fresh capture of the same model and shapes."""
    got = graph.captured.graph_hash()
    if got != plan.graph_hash:
        raise ValueError(f"plan graph_hash={plan.graph_hash} but this capture is {got}: "
                         "the plan was made for another model, shape or library version")
    return build_stages(graph, plan.assignment())
