"""What every entry point shares: resolving the Hydra config into plain library arguments.

Hydra stays here (STYLE 5): library code gets plain dicts and frozen dataclasses.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.resources
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from partition import PartitionRequest, RequestError

def conf_dir() -> Path:
    """The configuration: ``experiments.conf`` (the repository's ``conf/``, which an install
    ships as package data), or ``conf/`` beside the package in a checkout run in place."""
    try:
        return Path(str(importlib.resources.files("experiments.conf")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "conf"


CONF_DIR = str(conf_dir())


class ConfigError(ValueError):
    """A bad configuration value: reported as one line, exit code 2."""


def plain(cfg: DictConfig | Any) -> Any:
    """A config as plain data: resolved, enums as their names (library code takes strings)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) \
        if isinstance(cfg, DictConfig) else cfg


def schedule_of(par: Mapping):
    """The run's :class:`asyncdiff.Schedule` from the ``parallel`` settings (resolved plain
    data): the one place the configuration becomes a schedule. ValueError names the key."""
    from asyncdiff.schedule import Schedule  # the runtime only when a config is resolved
    return Schedule(n=par["n"], stride=par.get("stride", 1), warmup=par.get("warmup", 1),
                    cooldown=par.get("cooldown") or 0, sync=tuple(par.get("sync") or ()),
                    time_shift=bool(par.get("time_shift", False)),
                    stride_noise=par.get("stride_noise", "fresh"),
                    cache_interval=par.get("cache_interval") or 0,
                    cfg_parallel=bool(par.get("cfg_parallel", False)),
                    replicas=par.get("replicas", 1))


def parallel_rounds(schedule, steps: int) -> int:
    """The parallel rounds of the run's timeline (what the latency prediction counts)."""
    return len(schedule.timeline(steps, clamp=True).parallel_rounds)


def sequential_rounds(schedule, steps: int) -> int:
    """The run's sequential rounds (warm-up, sync, cool-down; official's load-only step
    rides on the last warm-up round): the full steps the latency prediction counts."""
    return sum(r.sequential for r in schedule.timeline(steps, clamp=True).rounds)


def partition_request(part: dict, n: int) -> PartitionRequest:
    options = {k: part[k] for k in ("boundaries", "stages", "shell_depth", "shell_slack")
               if part.get(k) is not None}
    cap = part.get("memory_cap_mb")
    return PartitionRequest(n=int(n), depth=part.get("depth"), slack=float(part.get("slack", 0.01)),
                            memory_cap=int(cap * 2**20) if cap is not None else None,
                            options=options, target=float(part.get("target", 1.02)),
                            deepen=int(part.get("deepen", 0)), refine=int(part.get("refine", 0)))


@contextlib.contextmanager
def requested(what: str = "partition"):
    """A request the model cannot satisfy (``partition.RequestError``: too many stages for
    its blocks, a boundary it does not have) is bad input: a :class:`ConfigError`."""
    try:
        yield
    except RequestError as err:
        raise ConfigError(f"{what}: {err}") from None


FAILED = "FAILED"  # in a run directory whose task ended in an error: what, and where


def exit_on_bad_input(fn: Callable) -> Callable:
    """Turn a :class:`ConfigError` into one line on stderr and exit code 2. Every other
    failure keeps its traceback and Hydra's non-zero exit code. Either way the run directory
    Hydra made for the task gets a :data:`FAILED` file (the error's first line, then its
    traceback): a run that failed half-way never looks complete."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            mark_failed(err)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except BaseException as err:
            if not (isinstance(err, SystemExit) and err.code in (0, None)):
                mark_failed(err)
            raise
    return wrapped


def mark_failed(err: BaseException) -> None:
    """Write :data:`FAILED` into the Hydra task's run directory (none outside a task)."""
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from experiments import atomic

    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    if not out.is_dir():
        return
    first = (f"{type(err).__name__}: {err}".strip().splitlines() or [type(err).__name__])[0]
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    atomic.write_text(out / FAILED, f"{first}\n\n{tb}")
