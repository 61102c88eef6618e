"""One plan for every rank: rank 0 makes it, every rank keeps only its own stage.

Used by every path that plans inside an initialised process group (``asyncdiff-run`` under
torchrun, the drop-in's distributed mode). A failure on any rank — capture, planning,
building the stages — is raised on every rank, naming the ranks and the cause, instead of
leaving the others waiting in a collective.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from asyncdiff.distributed import liveness
from asyncdiff.hoisted import model_inputs_of
from partition import REGISTRY, Plan
from partition.stages import StagedModel

T = TypeVar("T")
log = logging.getLogger(__name__)


class RankError(RuntimeError):
    """Something failed on some rank; raised on every rank."""


def on_every_rank(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it raises anywhere, raise on every rank (the errors are
    exchanged through the rendezvous store: ``liveness.py``)."""
    result, error = None, ""
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        error = f"{type(err).__name__}: {first}"
    errors = liveness.exchange(what, error)
    failed = {r: e for r, e in enumerate(errors) if e}
    if failed:
        raise RankError(f"{what} failed on rank(s) {sorted(failed)}: "
                        f"{next(iter(failed.values()))}")
    return result  # type: ignore[return-value]


def plan_from_rank0(make: Callable[[], Plan], what: str = "planning") -> Plan:
    """Rank 0 runs ``make``; every rank gets its plan (or its error) and checks the hash."""
    shared = ""
    if dist.get_rank() == 0:
        try:
            shared = json.dumps({"plan": make().to_json()})
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            shared = json.dumps({"error": f"{type(err).__name__}: {err}"})
    got = json.loads(liveness.exchange(what, shared)[0])
    if "error" in got:
        raise RankError(f"{what} failed on rank 0: {got['error']}")
    plan = Plan.from_json(got["plan"])
    check_plan_hash(plan)
    return plan


def check_plan_hash(plan: Plan) -> None:
    """Every worker must run the same plan: compare hashes before step 0."""
    hashes = liveness.exchange("the plan check", plan.plan_hash)
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        raise RuntimeError(f"plan hash mismatch: rank 0 has {hashes[0]}, ranks {bad} have "
                           f"{[hashes[r] for r in bad]}; all workers must load the same plan")


@dataclass
class RankStage:
    """What one rank keeps of a split: ``parts``, its stage's segments and prologues (only
    its own weights), and ``hoist_inputs``, the model inputs every stage's prologues read (the
    same on every rank: when they change, every rank re-posts the hoist group)."""

    parts: list
    hoist_inputs: tuple[str, ...]


def rank_stage(staged: StagedModel, stage: int) -> RankStage:
    return RankStage(list(staged.stage_parts(stage)),
                     tuple(sorted(model_inputs_of(staged.prologues, staged.placeholders))))


def own_stage(plan: Plan, captured, model, specs, inputs, contract, stage: int,
              threads: int | None = 1, runner=None) -> RankStage:
    """This rank's stage, rebuilt from its own capture (graph backend) or trace (module
    backend) of the same model; only its own weights are kept in its parts."""
    if plan.backend == "graph" and captured is None:
        raise RankError("rank 0 planned the graph backend, but this rank could not capture the "
                        "model: all ranks must run the same model and library versions")
    _, staged = REGISTRY[plan.backend].rebuild(model, specs, inputs, plan, captured=captured,
                                               contract=contract, threads=threads,
                                               runner=runner)
    own = rank_stage(staged, stage)
    return RankStage([p.stripped() for p in own.parts], own.hoist_inputs)
