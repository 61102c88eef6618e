"""The drop-in's arguments (``asyncdiff.parallelize``): how the denoiser is split
(:class:`Partitioning`: one split source), and what only the drop-in asks (its mode, what
becomes of the weights a rank does not use). The schedule is :class:`asyncdiff.Schedule`,
which checks itself. Bad arguments raise ValueError naming the key and the allowed values
(STYLE 8), at the call, before anything is captured."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asyncdiff.dropin import splits
from asyncdiff.dropin.weights import OFFLOAD
from asyncdiff.schedule import Schedule
from asyncdiff.step_cache import check_split
from partition import Plan, check_choice

MODES: tuple[str, ...] = ("emulate", "distributed")


@dataclass(frozen=True)
class Partitioning:
    """How the drop-in cuts the denoiser into ``n`` stages: a strategy (with its manual cut
    points or shell options, ``manual``), or a saved plan (its stages rebuilt)."""

    n: int
    strategy: str = "balanced"
    cost_model: str = "flops"
    depth: int | None = 4
    slack: float = 0.01
    manual: dict = field(default_factory=dict)  # PartitionRequest.options
    plan: Plan | None = None
    verify: bool = True
    backend: str = "auto"
    target: float = 1.02  # PartitionRequest.target, .deepen, .refine
    deepen: int = 0
    refine: int = 3


def partitioning(n, strategy, cost_model, depth, boundaries, stages, split, plan, verify,
                 backend, target: float = 1.02, deepen: int = 0,
                 refine: int = 3) -> Partitioning:
    """One split source: a strategy (with manual cut points), a named split, or a plan."""
    given = [k for k, v in (("boundaries", boundaries), ("stages", stages), ("split", split),
                            ("plan", plan)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"{given[0]} and {given[1]} given; allowed: one of boundaries, stages, "
                         "split, plan")
    manual = {k: v for k, v in (("boundaries", boundaries), ("stages", stages)) if v is not None}
    saved, slack = None, 0.01
    if split is not None:
        n_split, keys = splits.named(split)
        manual = {k: keys[k] for k in ("boundaries", "stages", "shell_depth", "shell_slack")
                  if k in keys}
        strategy = agree("strategy", strategy, keys.get("strategy"), f"split={split!r}")
        cost_model, depth = keys.get("cost_model", cost_model), keys.get("depth", depth)
        slack = float(keys.get("slack", slack))
        n = agree("n", n, n_split, f"split={split!r}")
    if plan is not None:
        saved = splits.saved(plan)
        n = agree("n", n, saved.n, "the plan")
        agree("backend", None if backend == "auto" else backend, saved.backend, "the plan")
        agree("strategy", strategy, saved.strategy, "the plan")
        strategy, cost_model, depth = saved.strategy, saved.cost_model, saved.depth
    if manual and split is None:
        strategy = agree("strategy", strategy, "manual", "boundaries/stages")
    if n is None:
        raise ValueError("n=None; allowed: an integer >= 1 (or a split or plan that sets it)")
    if not (isinstance(refine, int) and refine >= 0):
        raise ValueError(f"refine={refine!r}; allowed: an integer >= 0 (re-cuts on the "
                         "stages' measured times, cost_model='time')")
    if not (isinstance(deepen, int) and deepen >= 0):
        raise ValueError(f"deepen={deepen!r}; allowed: an integer >= 0 (module levels below "
                         "depth a cut may go)")
    if not (isinstance(target, (int, float)) and target >= 1):
        raise ValueError(f"target={target!r}; allowed: a number >= 1 (slowest stage over the "
                         "mean)")
    part = Partitioning(n, strategy or "balanced", cost_model, depth, slack, manual, saved,
                        verify, backend, float(target), deepen, refine)
    check_choice("strategy", part.strategy)
    check_choice("cost_model", part.cost_model)
    check_choice("backend", part.backend)
    return part


def agree(key: str, given: Any, implied: Any, source: str) -> Any:
    if given is not None and implied is not None and given != implied:
        raise ValueError(f"{key}={given!r}; allowed: {implied!r} (what {source} sets)")
    return implied if implied is not None else given


def check(part: Partitioning, schedule: Schedule, mode: str, offload: str,
          step_timeout_s: float | None) -> None:
    """What the drop-in adds to the schedule's and the split's own checks: its mode and
    weights, the step cache's split and mode, and (distributed) the process group."""
    for key, value, allowed in (("mode", mode, MODES), ("offload", offload, OFFLOAD)):
        if value not in allowed:
            raise ValueError(f"{key}={value!r}; allowed: {', '.join(allowed)}")
    if step_timeout_s is not None and not (isinstance(step_timeout_s, (int, float))
                                           and step_timeout_s > 0):
        raise ValueError(f"step_timeout_s={step_timeout_s!r}; allowed: a number of seconds "
                         "> 0, or None (derived from the plan)")
    if schedule.cache_interval:
        check_split(part.strategy, schedule.cache_interval)
        if mode != "emulate":
            raise ValueError(f"mode={mode!r} with cache_interval={schedule.cache_interval}; "
                             "allowed: 'emulate' (the step cache runs on one device)")
    if mode == "distributed":
        check_group(schedule)


def check_group(schedule: Schedule) -> None:
    """The environment: an initialised process group of exactly the ranks the schedule needs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mode='distributed' needs an initialised torch.distributed process "
                           "group (run under torchrun and call "
                           "torch.distributed.init_process_group() first)")
    world = schedule.world_size(1)
    if dist.get_world_size() != world:
        raise ValueError(f"world size {dist.get_world_size()}; {schedule.describe()} needs "
                         f"exactly {world} ranks")
