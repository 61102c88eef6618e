"""The paper's own splits (AsyncDiff's hand-written split tables for SD 1.5, SD 2.1 and
SDXL, N = 2, 3, 4), as the compiler's data: ``partition/paper_splits/<name>.yaml``. The
command line offers each as ``partition=<name>`` (``experiments/schema.py`` registers them)
and the drop-in as ``parallelize(pipe, split="<name>")``: both read them here."""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field

import yaml


@dataclass(frozen=True)
class Split:
    """A named split: the model it was written for, N, and the request that makes it."""

    name: str
    model: str
    n: int
    strategy: str
    cost_model: str
    depth: int | None
    slack: float
    options: dict = field(default_factory=dict)  # boundaries, or stages

    def request(self):
        """The :class:`partition.PartitionRequest` that makes it."""
        from partition.strategies.base import PartitionRequest  # the compiler, when used
        return PartitionRequest(n=self.n, depth=self.depth, slack=self.slack,
                                options=dict(self.options))


def _folder():
    return importlib.resources.files("partition") / "paper_splits"


def names() -> list[str]:
    return sorted(p.name[:-len(".yaml")] for p in _folder().iterdir()
                  if p.name.endswith(".yaml"))


def named(name: str) -> Split:
    """The split ``name``; ValueError naming the allowed names for another."""
    known = names()
    if name not in known:
        raise ValueError(f"split={name!r}; allowed: {', '.join(known)}")
    data = yaml.safe_load((_folder() / f"{name}.yaml").read_text())
    return Split(name=name, model=data["model"], n=int(data["n"]), strategy=data["strategy"],
                 cost_model=data["cost_model"], depth=data["depth"],
                 slack=float(data["slack"]),
                 options={k: data[k] for k in ("boundaries", "stages") if k in data})
