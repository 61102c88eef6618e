"""One validator every strategy's output passes through (STYLE 3)."""
from __future__ import annotations

from partition.graph import TrunkGraph
from partition.strategies.base import Assignment, RequestError


def validate_assignment(graph: TrunkGraph, a: Assignment) -> None:
    """Every trunk node on exactly one stage in range, no empty stage, ε on the last stage."""
    if a.n < 1:
        raise ValueError(f"n={a.n}; allowed: n >= 1")
    if len(a.stage_of) != graph.size:
        raise ValueError(f"assignment covers {len(a.stage_of)} nodes, graph has {graph.size}")
    bad = sorted({s for s in a.stage_of if not 0 <= s < a.n})
    if bad:
        raise ValueError(f"assignment uses stages {bad}; allowed: 0..{a.n - 1}")
    empty = sorted(set(range(a.n)) - set(a.stage_of))
    if empty:
        raise RequestError(f"stages {empty} are empty: too many stages for this model/depth")
    producers = [i for i, c in enumerate(graph.consumers) if graph.size in c]
    if any(a.stage_of[i] != a.n - 1 for i in producers):
        raise ValueError("the stage emitting the output must be the last stage (n-1)")
    for _stage, start, _stop in a.segments():
        # a segment may not start where a tuple value is alive (it could not be sent)
        if start and not graph.cuttable[start]:
            raise ValueError(f"cut at node {graph.trunk[start]!r} would split a tuple value")
