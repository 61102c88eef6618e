"""The compiler in one call: capture → cost → graph → strategy → stages → verify → plan.

Two backends feed the same Plan (docs/design.md §1; ``partition/backend.py``): ``graph``
(torch.export: ``partition/graph_backend.py``) and ``module`` (the network's own blocks:
``partition/modular``). Both, and every strategy, are chosen by name from a registry;
``backend="auto"`` (the default) takes the graph backend and falls back to the module backend
when capture fails, saying so in the plan's notes.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from partition.backend import BACKENDS, Backend, Compiled, capture_or_fallback
from partition.capture import Captured, capture
from partition.contract import DenoiserContract
from partition.cost import COST_MODELS, NodeCosts
from partition.graph_backend import GraphBackend, compile_graph
from partition.modular import ModuleBackend
from partition.plan import Plan
from partition.spec import InputSpec
from partition.stages import StagedModel
from partition.strategies.base import PartitionRequest, RequestError
from partition.strategies.registry import STRATEGIES, get_strategy

REGISTRY: dict[str, Backend] = {"graph": GraphBackend(), "module": ModuleBackend()}

# what a request may name, by key: every front end checks against these (the command line's
# enums are made from them: experiments/schema.py)
CHOICES: dict[str, tuple[str, ...]] = {"strategy": tuple(STRATEGIES), "cost_model": COST_MODELS,
                                       "backend": BACKENDS}

__all__ = ["BACKENDS", "CHOICES", "Compiled", "REGISTRY", "STRATEGIES", "check_choice",
           "compile_from_plan", "compile_graph", "compile_model", "get_strategy",
           "stages_from_plan"]


def check_choice(key: str, name: str) -> str:
    """``name`` if it is one of ``CHOICES[key]``, else RequestError naming the allowed."""
    if name not in CHOICES[key]:
        raise RequestError(f"{key}={name!r}; allowed: {', '.join(CHOICES[key])}")
    return name


def compile_model(model: nn.Module, specs: tuple[InputSpec, ...], inputs: dict[str, torch.Tensor],
                  request: PartitionRequest, *, strategy: str = "balanced",
                  cost_model: str = "flops", name: str = "model", config_hash: str = "",
                  repeats: int = 1, threads: int | None = 1, captured: Captured | None = None,
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
    if captured is None and not note:
        captured, note = capture_or_fallback(
            lambda: capture(model, specs, inputs, contract), backend)
    chosen = "graph" if captured is not None and backend != "module" else "module"
    return REGISTRY[chosen].compile(
        model, specs, inputs, request, strategy=strategy, cost_model=cost_model, name=name,
        config_hash=config_hash, repeats=repeats, threads=threads, captured=captured,
        costs=costs, device=device, contract=contract, verify=verify, runner=runner,
        note=note)


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
    impl = REGISTRY[plan.backend]
    graph, staged = impl.rebuild(model, specs, inputs, plan, captured=captured,
                                 contract=contract, threads=threads, runner=runner)
    checked = impl.verify(graph, staged, inputs, threads, name) if verify else \
        "off: not verified (verify=False)"  # raises if the stages differ
    # what this load checked (excluded from plan_hash, like the measured times)
    return Compiled(plan=dataclasses.replace(plan, verification=checked), staged=staged,
                    graph=graph)


def stages_from_plan(graph, plan: Plan, runner=None) -> StagedModel:
    """Rebuild the stages of a saved plan on ``graph``: a fresh capture (graph backend) or
    trace (module backend) of the same model and shapes."""
    return REGISTRY[plan.backend].stages(graph, plan, runner)
