"""A split written by hand as module paths (the paper's own splits are such configs).

Two forms, both in YAML:

* ``boundaries: [up_blocks.1.attentions.2]`` — contiguous: stage ``j`` starts at the first
  trunk node traced inside ``boundaries[j-1]``.
* ``stages: [[down_blocks.2, mid_block], [conv_in, down_blocks.0, ..., conv_out]]`` — each
  stage lists the modules it owns, in any order, so non-contiguous placements such as the
  paper's SDXL "shell" are expressible. The last list is the stage that emits the output.
  Trunk nodes outside every listed module (glue such as ``conv_act`` or a skip ``cat``)
  go with the next owned node in execution order (the previous one at the very end).
"""
from __future__ import annotations

from partition.graph import TrunkGraph
from partition.strategies.base import Assignment, PartitionRequest, RequestError


def _within(module: str, path: str) -> bool:
    return module == path or module.startswith(path + ".")


def _known_paths(graph: TrunkGraph, limit: int = 12) -> str:
    seen: list[str] = []
    for m in graph.modules:
        top = ".".join(m.split(".")[:2])
        if top and top not in seen:
            seen.append(top)
    return ", ".join(seen[:limit]) + (" …" if len(seen) > limit else "")


def manual(graph: TrunkGraph, request: PartitionRequest) -> Assignment:
    opts = request.options
    if ("boundaries" in opts) == ("stages" in opts):
        raise RequestError("manual split: give exactly one of 'boundaries' or 'stages'")
    if "boundaries" in opts:
        return _from_boundaries(graph, list(opts["boundaries"]), request.n)
    return _from_stages(graph, [list(s) for s in opts["stages"]], request.n)


def _from_boundaries(graph: TrunkGraph, boundaries: list[str], n: int) -> Assignment:
    if len(boundaries) != n - 1:
        raise RequestError(f"boundaries: {len(boundaries)} given for n={n}; allowed: exactly n-1")
    cuts = []
    for path in boundaries:
        hits = [i for i, m in enumerate(graph.modules) if _within(m, path)]
        if not hits:
            raise RequestError(f"boundaries: no traced module {path!r}; top-level modules: "
                             f"{_known_paths(graph)}")
        cuts.append(hits[0])
    if cuts != sorted(cuts) or len(set(cuts)) != len(cuts) or cuts[0] == 0:
        raise RequestError(f"boundaries: {boundaries} must be strictly increasing in execution "
                         "order and not at the very first node")
    return Assignment.from_cuts(cuts, graph.size, "manual", (f"boundaries={boundaries}",))


def _from_stages(graph: TrunkGraph, stages: list[list[str]], n: int) -> Assignment:
    if len(stages) != n:
        raise RequestError(f"stages: {len(stages)} lists given for n={n}; allowed: exactly n")
    owner: list[int | None] = []
    for m in graph.modules:
        best, best_len = None, -1
        for s, paths in enumerate(stages):
            for p in paths:
                if _within(m, p) and len(p) > best_len:
                    best, best_len = s, len(p)
        owner.append(best)
    for s, paths in enumerate(stages):
        for p in paths:
            if not any(_within(m, p) for m in graph.modules):
                raise RequestError(f"stages[{s}]: no traced module {p!r}; top-level modules: "
                                 f"{_known_paths(graph)}")
    nxt = None
    stage_of = [0] * graph.size
    for i in range(graph.size - 1, -1, -1):
        if owner[i] is not None:
            nxt = owner[i]
        stage_of[i] = owner[i] if owner[i] is not None else nxt  # type: ignore[assignment]
    prev = None
    for i in range(graph.size):
        if stage_of[i] is None:
            stage_of[i] = prev
        prev = stage_of[i]
    return Assignment(tuple(int(s) for s in stage_of), n, "manual", ("stages listed by module",))
