"""The splits the drop-in accepts besides a strategy: cut points by hand, a named split
configuration (the paper's, ``conf/partition/paper_*.yaml``), or a saved ``plan.json``.

The named configurations are the same YAML files the command line reads (``partition=…``);
they travel in the wheel as package data of ``experiments.conf`` and are read here as data
(yaml), so the drop-in needs neither Hydra nor the experiments layer.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from partition import Plan

# the keys of a partition configuration that shape the split (conf/partition/*.yaml)
SPLIT_KEYS = ("strategy", "cost_model", "depth", "slack", "boundaries", "stages", "shell_depth",
              "shell_slack")


def _conf_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("experiments.conf")))
    except ModuleNotFoundError:  # a checkout run in place without the package installed
        return Path(__file__).resolve().parents[2] / "conf"


def named(name: str) -> tuple[int | None, dict[str, Any]]:
    """``(n, partition keys)`` of ``conf/partition/<name>.yaml``."""
    folder = _conf_dir() / "partition"
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in known:
        raise ValueError(f"split={name!r}; allowed: {', '.join(known)}")
    data = yaml.safe_load((folder / f"{name}.yaml").read_text()) or {}
    part = data.get("partition", data)  # '@package _global_' files nest under partition:
    n = (data.get("parallel") or {}).get("n")
    return n, {k: part[k] for k in SPLIT_KEYS if part.get(k) is not None}


def saved(plan: str | Path | Plan) -> Plan:
    """A plan as ``asyncdiff-plan`` or a run wrote it (``plan.json``), or a Plan."""
    if isinstance(plan, Plan):
        return plan
    path = Path(plan)
    if not path.is_file():
        raise ValueError(f"plan={str(plan)!r}; allowed: the path of a plan.json "
                         "(asyncdiff-plan writes one) or a partition.Plan")
    return Plan.from_json(path.read_text())
