"""Min–max balanced contiguous cuts, with a communication-aware tie-break and a memory cap.

Exact dynamic programme over candidate cut positions (module boundaries at a depth):
phase 1 minimises the slowest stage; phase 2, among splits whose slowest stage is within
``1 + slack`` of that optimum, minimises the bytes sent per step — each stage charged the
values made before it that it reads, once each (``TrunkGraph.inbound_bytes``), which is
exactly the point-to-point traffic of a contiguous split. A stage's cost is its trunk plus the
per-step conditioning it replicates (``TrunkGraph.stage_cost_matrix``), so a stage that must
recompute a heavy timestep-dependent embedding is charged for it.
"""
from __future__ import annotations

import numpy as np

from partition.graph import TrunkGraph
from partition.strategies.base import Assignment, PartitionRequest, RequestError

_INF = float("inf")


def min_max_cuts(cost: np.ndarray, q: np.ndarray, n: int, *, feasible: np.ndarray | None = None,
                 inbound: np.ndarray | None = None, slack: float = 0.0) -> list[int]:
    """Best ``n-1`` cuts among the inner entries of ``q`` (sorted positions, first and last
    are the ends).

    ``cost[a, j]``: cost of a stage spanning blocks ``a .. j-1`` (positions ``q[a] .. q[j]-1``);
    ``feasible[a, j]`` (optional): whether such a stage is allowed (memory cap);
    ``inbound[a, j]`` (optional): the bytes it receives, for the tie-break.
    """
    q = np.asarray(q, dtype=np.int64)
    m = len(q)
    if n > m - 1:
        raise RequestError(f"n={n} stages but only {m - 1} blocks at this depth; allowed: n <= {m - 1}")
    cost = np.where(feasible, cost, _INF) if feasible is not None else cost

    # phase 1: best[s][j] = minimal max stage cost covering blocks 0..j with s+1 stages
    best = np.full((n, m), _INF)
    best[0, 1:] = cost[0, 1:]
    for s in range(1, n):
        for j in range(s + 1, m):
            i = np.arange(s, j)
            best[s, j] = np.min(np.maximum(best[s - 1, i], cost[i, j]))
    opt = best[n - 1, m - 1]
    if not np.isfinite(opt):
        raise RequestError("memory_cap: no split into the requested stages fits under the cap")
    limit = opt * (1 + slack) + 1e-12 * max(abs(opt), 1.0)
    # phase 2: fewest bytes among splits whose every stage is within the limit; ties -> lower max
    recv = np.zeros((m, m)) if inbound is None else inbound
    score = np.full((n, m), _INF)
    worst = np.full((n, m), _INF)
    back = np.zeros((n, m), dtype=np.int64)
    ok0 = cost[0, 1:] <= limit
    score[0, 1:] = np.where(ok0, 0.0, _INF)
    worst[0, 1:] = np.where(ok0, cost[0, 1:], _INF)
    for s in range(1, n):
        for j in range(s + 1, m):
            i = np.arange(s, j)
            c = cost[i, j]
            ok = (c <= limit) & np.isfinite(score[s - 1, i])
            if not ok.any():
                continue
            cand = np.where(ok, score[s - 1, i] + recv[i, j], _INF)
            w = np.where(ok, np.maximum(worst[s - 1, i], c), _INF)
            order = np.lexsort((w, cand))  # fewest bytes, then the better balance
            k = order[0]
            score[s, j], worst[s, j], back[s, j] = cand[k], w[k], i[k]
    cuts, j = [], m - 1
    for s in range(n - 1, 0, -1):
        j = int(back[s, j])
        cuts.append(int(q[j]))
    return sorted(cuts)


def balanced(graph: TrunkGraph, request: PartitionRequest) -> Assignment:
    """Min–max balanced contiguous split at module boundaries (the default strategy); where
    none at ``request.depth`` reaches ``request.target``, up to ``request.deepen`` levels
    deeper around the cuts (:func:`deepened`)."""
    cands = graph.candidates(request.depth)
    cuts = _solve(graph, cands, request)
    notes: tuple[str, ...] = ()
    if request.deepen and request.depth is not None and request.n > 1:
        before = stage_imbalance(graph, cuts, request.n)
        cands, cuts, level = deepened(graph, request, cands, cuts)
        top = set(graph.candidates(request.depth))
        if any(c not in top for c in cuts):
            notes = (f"cuts below depth {request.depth} (down to module depth {level}): the "
                     f"best split at depth {request.depth} predicted imbalance {before:.3f}, "
                     f"above the target {request.target:g}; this one "
                     f"{stage_imbalance(graph, cuts, request.n):.3f}",)
    return Assignment.from_cuts(cuts, graph.size, "balanced", notes)


def _solve(graph: TrunkGraph, cands, request: PartitionRequest) -> list[int]:
    q = np.array([0, *sorted(cands), graph.size], dtype=np.int64)
    return min_max_cuts(graph.stage_cost_matrix(q), q, request.n,
                        feasible=memory_feasible(graph, q, request.memory_cap),
                        inbound=graph.inbound_bytes(q), slack=request.slack)


def stage_imbalance(graph: TrunkGraph, cuts: list[int], n: int) -> float:
    """Slowest over mean of the stage costs of a contiguous split (conditioning included)."""
    cost = graph.stage_costs(Assignment.from_cuts(cuts, graph.size, "").stage_of, n)
    return float(cost.max() / cost.mean()) if cost.mean() > 0 else 1.0


def deepened(graph: TrunkGraph, request: PartitionRequest, cands: list[int],
             cuts: list[int]) -> tuple[list[int], list[int], int]:
    """Granularity where it matters: while the best split's predicted imbalance is above the
    target, add the module boundaries one level deeper inside the blocks that matter — the
    blocks on either side of each cut and the blocks holding an ideal cut (where the running
    cost crosses j/N of the total) — and solve again; at most ``request.deepen`` levels. The
    new positions obey the stage builder's rules as every candidate does (``cuttable``).
    Returns the candidates, the cuts and the deepest level looked at."""
    level = request.depth
    prefix = np.concatenate([[0.0], np.cumsum(graph.weights)])
    total = prefix[-1]
    ideal = [int(np.searchsorted(prefix, total * j / request.n)) for j in range(1, request.n)]
    while level < request.depth + request.deepen and \
            stage_imbalance(graph, cuts, request.n) > request.target:
        level += 1
        bounds = [0, *sorted(cands), graph.size]
        blocks = set()
        for p in [*cuts, *ideal]:
            i = int(np.searchsorted(bounds, p, side="right")) - 1  # the block holding p
            blocks.update(b for b in (i - 1, i) if 0 <= b < len(bounds) - 1)
        finer = [p for p in graph.candidates(level)
                 if any(bounds[b] < p < bounds[b + 1] for b in blocks)]
        if finer:
            cands = sorted(set(cands) | set(finer))
            cuts = _solve(graph, cands, request)
    return cands, cuts, level


def memory_feasible(graph: TrunkGraph, q: np.ndarray, cap: int | None) -> np.ndarray | None:
    """``F[a, j]``: does a stage spanning ``q[a] .. q[j]-1`` hold at most ``cap`` parameter
    bytes (its own trunk parameters and the per-step conditioning it replicates)?"""
    if cap is None:
        return None
    return graph.stage_param_matrix(q) <= cap


def equal_blocks(graph: TrunkGraph, request: PartitionRequest) -> Assignment:
    """Baseline: the same number of module blocks (at ``depth``) in every stage."""
    if request.memory_cap is not None:
        raise RequestError("memory_cap: not supported by strategy equal_blocks (a fixed "
                         "baseline); allowed with: balanced, shell_core")
    cands = graph.candidates(request.depth)
    blocks = len(cands) + 1
    if request.n > blocks:
        raise RequestError(f"n={request.n} stages but only {blocks} blocks; allowed: n <= {blocks}")
    cuts = [cands[round(j * blocks / request.n) - 1] for j in range(1, request.n)]
    return Assignment.from_cuts(sorted(set(cuts)), graph.size, "equal_blocks")
