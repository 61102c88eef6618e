"""The compiler in one call: capture → cost → graph → strategy → stages → verify → plan.

Two backends feed the same Plan (docs/design.md §1): ``graph`` (torch.export; stages are cut from
the captured graph and hold only their own weights) and ``module`` (``partition/modular``:
stages are sets of the network's own blocks, run eagerly), for networks torch.export cannot
capture. ``backend="auto"`` (the default) takes the graph backend and falls back to the module
backend when capture fails, saying so in the plan's notes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partition.capture import Captured, CaptureError, capture
from partition.contract import DenoiserContract
from partition.cost import COST_MODELS, NodeCosts, profile
from partition.graph import TrunkGraph, build_graph
from partition.plan import Plan, make_plan
from partition.spec import InputSpec
from partition.stages import Hoisted, StagedModel, build_stages
from partition.strategies.balanced import balanced, equal_blocks
from partition.strategies.base import Assignment, Partitioner, PartitionRequest, RequestError
from partition.strategies.manual import manual
from partition.strategies.shell import shell_core
from partition.verify import verify as verify_stages

STRATEGIES: dict[str, Partitioner] = {
    "balanced": balanced,
    "equal_blocks": equal_blocks,
    "manual": manual,
    "shell_core": shell_core,
}
BACKENDS: tuple[str, ...] = ("auto", "graph", "module")


@dataclass
class Compiled:
    plan: Plan
    staged: StagedModel
    graph: Any  # TrunkGraph (graph backend) or partition.modular.BlockGraph (module backend)


# what a request may name, by key: every front end checks against these (the command line's
# enums are made from them: experiments/schema.py)
CHOICES: dict[str, tuple[str, ...]] = {"strategy": tuple(STRATEGIES), "cost_model": COST_MODELS,
                                       "backend": BACKENDS}


def check_choice(key: str, name: str) -> str:
    """``name`` if it is one of ``CHOICES[key]``, else RequestError naming the allowed."""
    if name not in CHOICES[key]:
        raise RequestError(f"{key}={name!r}; allowed: {', '.join(CHOICES[key])}")
    return name


def get_strategy(name: str) -> Partitioner:
    return STRATEGIES[check_choice("strategy", name)]


def compile_model(model: nn.Module, specs: tuple[InputSpec, ...], inputs: dict[str, torch.Tensor],
                  request: PartitionRequest, *, strategy: str = "balanced",
                  cost_model: str = "flops", name: str = "model", config_hash: str = "",
                  repeats: int = 3, threads: int | None = 1, captured: Captured | None = None,
                  costs: NodeCosts | None = None, device: str | None = None,
                  contract: DenoiserContract | None = None, verify: bool = True,
                  backend: str = "auto", runner=None, note: str = "") -> Compiled:
    """Plan ``model`` into ``request.n`` stages; pass ``captured``/``costs`` to reuse them.

    ``contract``: how the model is called and which output is ε (partition/contract.py).
    ``cost_model``: ``flops`` (default: deterministic, no timing), ``fvcore``, or ``time``
    (``repeats`` timed forwards of the eager model at ``threads`` threads, on ``device``:
    default where ``inputs`` are). ``verify``: check the stages against the eager model on
    ``inputs`` (partition/verify.py); ``False`` skips it, and the plan says so.
    ``backend``: ``auto``, ``graph`` or ``module`` (module docstring). ``runner``
    (module backend): how its stages run the network at run time, when calling ``model``
    itself is not the way (the drop-in, whose pipeline calls a patched forward). ``note``:
    why the module backend was chosen, when the caller tried the capture itself (it goes
    into the plan's notes).
    """
    check_choice("cost_model", cost_model)
    check_choice("backend", backend)
    check_choice("strategy", strategy)
    contract = contract or (captured.contract if captured is not None else DenoiserContract())
    fallback = note
    if backend != "module" and captured is None:
        try:
            captured = capture(model, specs, inputs, contract)
        except CaptureError as err:
            if backend == "graph":
                raise
            fallback = f"module backend: torch.export could not capture the model ({err})"
    if backend == "module" or fallback:
        from partition.modular import compile_modular
        return compile_modular(model, specs, inputs, request, strategy=strategy,
                               cost_model=cost_model, name=name, config_hash=config_hash,
                               repeats=repeats, threads=threads, contract=contract,
                               verify=verify, note=fallback, runner=runner)
    if costs is None:
        costs = profile(captured, inputs, repeats=repeats if cost_model == "time" else 0,
                        threads=threads, fvcore_model=model if cost_model == "fvcore" else None,
                        device=device)
    graph = build_graph(captured, costs, cost_model)
    return compile_graph(graph, request, strategy=strategy, cost_model=cost_model, name=name,
                         config_hash=config_hash, inputs=inputs if verify else None,
                         threads=threads, verify=verify)


def compile_graph(graph: TrunkGraph, request: PartitionRequest, *, strategy: str,
                  cost_model: str, name: str, config_hash: str,
                  inputs: dict[str, torch.Tensor] | None = None, threads: int | None = None,
                  verify: bool = True) -> Compiled:
    """Cut an already captured and costed graph; verified against the eager model when
    ``inputs`` are given (``verify=False`` or no inputs: the plan says it is unverified)."""
    if request.n < 1:
        raise RequestError(f"n={request.n}; allowed: n >= 1")
    assignment = (Assignment((0,) * graph.size, 1, strategy) if request.n == 1
                  else get_strategy(strategy)(graph, request))
    staged = build_stages(graph, assignment)
    checked, stage_ms, step_ms = _check(graph, staged, inputs, threads, verify, name)
    plan = make_plan(graph, assignment, staged, model=name, config_hash=config_hash,
                     cost_model=cost_model, depth=request.depth, verification=checked,
                     stage_ms=stage_ms, step_ms=step_ms)
    return Compiled(plan=plan, staged=staged, graph=graph)


def _check(graph, staged, inputs, threads, verify: bool, name: str):
    if not verify:
        return "off: not verified (verify=False)", None, None
    if inputs is None:
        return "off: not verified (no example inputs given to compile_graph)", None, None
    result = verify_stages(graph, staged, inputs, threads=threads, model=name)
    return result.note, result.stage_ms, result.step_ms


def compile_from_plan(model: nn.Module, specs: tuple[InputSpec, ...],
                      inputs: dict[str, torch.Tensor], plan: Plan, *,
                      captured: Captured | None = None, threads: int | None = 1,
                      contract: DenoiserContract | None = None, verify: bool = True,
                      runner=None, name: str = "model") -> Compiled:
    """The stages of a saved plan (``plan.json``) for ``model`` at these inputs, rebuilt from a
    fresh capture (graph backend) or trace (module backend) and verified against the eager
    model like a new compile; the plan is returned as saved but for its ``verification``
    note, which says what this load checked (its ``plan_hash`` unchanged).
    A plan made for another model, shape or library version is refused (graph hash)."""
    if plan.backend == "module":
        from partition.modular import graph_for_plan, verify_blocks
        from partition.modular import stages_from_plan as module_stages

        graph = graph_for_plan(model, specs, inputs, plan, contract, threads)
        staged = module_stages(graph, plan, runner)
        checked = verify_blocks(graph, staged, inputs, threads, name)[0] if verify else \
            "off: not verified (verify=False)"
    else:
        if captured is None:
            captured = capture(model, specs, inputs, contract or DenoiserContract())
        graph = build_graph(captured, NodeCosts({}, {}, {}), "flops")
        staged = stages_from_plan(graph, plan)
        checked = _check(graph, staged, inputs, threads, verify, name)[0]  # raises if it differs
    # what this load checked (excluded from plan_hash, like the measured times)
    return Compiled(plan=dataclasses.replace(plan, verification=checked), staged=staged,
                    graph=graph)


def stages_from_plan(graph: TrunkGraph, plan: Plan) -> StagedModel:
    """Rebuild the stages of a saved plan from a fresh capture of the same model and shapes."""
    if plan.backend == "module":
        from partition.modular import stages_from_plan as modular_stages
        return modular_stages(graph, plan)
    got = graph.captured.graph_hash()
    if got != plan.graph_hash:
        raise ValueError(f"plan graph_hash={plan.graph_hash} but this capture is {got}: "
                         "the plan was made for another model, shape or library version")
    placement = tuple(Hoisted(h.name, None if h.home < 0 else h.home, h.consumers)
                      for h in plan.hoisted)
    return build_stages(graph, plan.assignment(), placement)
