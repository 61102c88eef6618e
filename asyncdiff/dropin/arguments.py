"""The drop-in's arguments (``asyncdiff.parallelize``): one split source, the timeline's keys,
the partition's and the mode's, each checked at the call, before anything is captured. Bad
arguments raise ValueError naming the key and the allowed values (STYLE 8)."""
from __future__ import annotations

from typing import Any

from asyncdiff.dropin import splits
from asyncdiff.dropin.session import Options
from asyncdiff.dropin.weights import OFFLOAD
from asyncdiff.timeline import build_cache_timeline, build_timeline
from partition import STRATEGIES
from partition.api import BACKENDS
from partition.cost import COST_MODELS

MODES: tuple[str, ...] = ("emulate", "distributed")


def options(n, stride, warmup, time_shift, stride_noise, strategy, cost_model, depth,
             boundaries, stages, split, plan, mode, offload, verify, backend) -> Options:
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
    return Options(n, stride, warmup, time_shift, stride_noise, strategy or "balanced",
                   cost_model, depth, mode, offload, verify, backend, split=manual, slack=slack,
                   plan=saved)


def sync_steps(sync: Any) -> tuple[int, ...]:
    try:
        return tuple(sorted(set(sync)))
    except TypeError:
        raise ValueError(f"sync={sync!r}; allowed: a list of step indices") from None


def agree(key: str, given: Any, implied: Any, source: str) -> Any:
    if given is not None and implied is not None and given != implied:
        raise ValueError(f"{key}={given!r}; allowed: {implied!r} (what {source} sets)")
    return implied if implied is not None else given


def check(o: Options) -> None:
    """Bad arguments raise ValueError naming the key and the allowed values (STYLE 8)."""
    if not isinstance(o.cfg_parallel, bool):
        raise ValueError(f"cfg_parallel={o.cfg_parallel!r}; allowed: True, False")
    if not isinstance(o.cooldown, int) or isinstance(o.cooldown, bool) or o.cooldown < 0:
        raise ValueError(f"cooldown={o.cooldown!r}; allowed: an integer >= 0")
    bad = [k for k in o.sync if not isinstance(k, int) or isinstance(k, bool) or k < o.warmup]
    if bad:
        raise ValueError(f"sync={bad}; allowed: step indices >= warmup={o.warmup} (the run's "
                         "steps between warm-up and cool-down)")
    steps = max(o.warmup, 1, *(k + 1 for k in o.sync)) + o.stride + o.cooldown
    build_timeline(o.n, o.stride, o.warmup, steps, o.time_shift, o.stride_noise, o.cooldown,
                   o.sync)
    check_cache(o)
    for key, value, allowed in (("strategy", o.strategy, tuple(STRATEGIES)),
                                ("cost_model", o.cost_model, tuple(COST_MODELS)),
                                ("mode", o.mode, MODES), ("offload", o.offload, OFFLOAD),
                                ("backend", o.backend, BACKENDS)):
        if value not in allowed:
            raise ValueError(f"{key}={value!r}; allowed: {', '.join(allowed)}")
    if o.step_timeout_s is not None and not (isinstance(o.step_timeout_s, (int, float))
                                             and o.step_timeout_s > 0):
        raise ValueError(f"step_timeout_s={o.step_timeout_s!r}; allowed: a number of seconds "
                         "> 0, or None (derived from the plan)")
    if o.mode == "distributed":
        check_group(o)


def check_cache(o: Options) -> None:
    """The step cache is its own schedule on one device, on a shell/core split."""
    k = o.cache_interval
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"cache_interval={k!r}; allowed: an integer >= 0 (0: no step cache)")
    if not k:
        return
    for key, value, allowed in (("mode", o.mode, "emulate"), ("strategy", o.strategy,
                                                             "shell_core"),
                                ("warmup", o.warmup, 1), ("stride", o.stride, 1),
                                ("cooldown", o.cooldown, 0), ("sync", o.sync, ()),
                                ("time_shift", o.time_shift, False),
                                ("stride_noise", o.stride_noise, "fresh"),
                                ("cfg_parallel", o.cfg_parallel, False)):
        if value != allowed:
            raise ValueError(f"{key}={value!r} with cache_interval={k}; allowed: {allowed!r} "
                             "(the step cache is its own schedule, on one device, on a "
                             "shell/core split)")
    build_cache_timeline(o.n, k, k)


def check_group(opts: Options) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mode='distributed' needs an initialised torch.distributed process "
                           "group (run under torchrun and call "
                           "torch.distributed.init_process_group() first)")
    devices = opts.devices * (2 if opts.cfg_parallel else 1)
    if dist.get_world_size() != devices:
        raise ValueError(f"world size {dist.get_world_size()}; n={opts.n}, stride={opts.stride}, "
                         f"stride_noise={opts.stride_noise}, cfg_parallel={opts.cfg_parallel} "
                         f"need exactly {devices} ranks")
