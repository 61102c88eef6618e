"""The splits the drop-in accepts besides a strategy: cut points by hand, one of the paper's
splits by name (the compiler's data, ``partition/splits.py``, which the command line offers as
``partition=<name>`` too), or a saved ``plan.json``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from partition import Plan, splits


def named(name: str) -> tuple[int, dict[str, Any]]:
    """``(n, partition keys)`` of the paper's split ``name`` (``partition/splits.py``)."""
    s = splits.named(name)
    return s.n, {"strategy": s.strategy, "cost_model": s.cost_model, "depth": s.depth,
                 "slack": s.slack, **s.options}


def saved(plan: str | Path | Plan) -> Plan:
    """A plan as ``asyncdiff-plan`` or a run wrote it (``plan.json``), or a Plan."""
    if isinstance(plan, Plan):
        return plan
    path = Path(plan)
    if not path.is_file():
        raise ValueError(f"plan={str(plan)!r}; allowed: the path of a plan.json "
                         "(asyncdiff-plan writes one) or a partition.Plan")
    return Plan.from_json(path.read_text())
