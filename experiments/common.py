"""What every entry point shares: resolving the Hydra config into plain library arguments.

Hydra stays here (STYLE 5): library code gets plain dicts and frozen dataclasses.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from partition import PartitionRequest

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class ConfigError(ValueError):
    """A bad configuration value: reported as one line, exit code 2."""


def plain(cfg: DictConfig | Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def partition_request(part: dict, n: int) -> PartitionRequest:
    options = {k: part[k] for k in ("boundaries", "stages", "shell_depth", "shell_slack")
               if part.get(k) is not None}
    cap = part.get("memory_cap_mb")
    return PartitionRequest(n=int(n), depth=part.get("depth"), slack=float(part.get("slack", 0.01)),
                            memory_cap=int(cap * 2**20) if cap is not None else None,
                            options=options)


def exit_on_bad_input(fn: Callable) -> Callable:
    """Turn a ValueError from config validation into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    return wrapped
