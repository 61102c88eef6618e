"""Min–max balanced contiguous cuts, with a communication-aware tie-break and a memory cap.

Exact dynamic programme over candidate cut positions (module boundaries at a depth):
phase 1 minimises the slowest stage; phase 2, among splits whose slowest stage is within
``1 + slack`` of that optimum, minimises the bytes sent per step — each stage charged the
values made before it that it reads, once each (``TrunkGraph.inbound_bytes``), which is
exactly the point-to-point traffic of a contiguous split.
"""
from __future__ import annotations

import numpy as np

from partition.graph import TrunkGraph
from partition.strategies.base import Assignment, PartitionRequest

_INF = float("inf")


def min_max_cuts(prefix: np.ndarray, positions: list[int], n: int, *,
                 feasible=None, inbound=None, slack: float = 0.0) -> list[int]:
    """Best ``n-1`` cuts chosen from ``positions`` (inner positions, sorted).

    ``prefix[p]`` is the cost of positions ``0..p-1``; ``feasible(i, j)`` (optional) says
    whether a stage spanning positions ``i..j-1`` is allowed (memory cap); ``inbound(q)``
    (optional) gives the matrix of bytes each candidate stage receives, for the tie-break.
    """
    q = np.array([0, *positions, len(prefix) - 1], dtype=np.int64)
    m = len(q)
    if n > m - 1:
        raise ValueError(f"n={n} stages but only {m - 1} blocks at this depth; allowed: n <= {m - 1}")
    cost = prefix[q]

    def seg(i_idx: np.ndarray, j: int) -> np.ndarray:
        c = cost[j] - cost[i_idx]
        if feasible is not None:
            ok = np.array([feasible(q[i], q[j]) for i in i_idx], dtype=bool)
            c = np.where(ok, c, _INF)
        return c

    # phase 1: best[s][j] = minimal max stage cost covering blocks 0..j with s+1 stages
    best = np.full((n, m), _INF)
    for j in range(1, m):
        best[0, j] = seg(np.array([0]), j)[0]
    for s in range(1, n):
        for j in range(s + 1, m):
            i = np.arange(s, j)
            best[s, j] = np.min(np.maximum(best[s - 1, i], seg(i, j)))
    opt = best[n - 1, m - 1]
    if not np.isfinite(opt):
        raise ValueError("memory_cap: no split into the requested stages fits under the cap")
    limit = opt * (1 + slack) + 1e-12 * max(abs(opt), 1.0)
    # phase 2: fewest bytes among splits whose every stage is within the limit; ties -> lower max
    recv = np.zeros((m, m)) if inbound is None else inbound(q)
    score = np.full((n, m), _INF)
    worst = np.full((n, m), _INF)
    back = np.zeros((n, m), dtype=np.int64)
    for j in range(1, m):
        c = seg(np.array([0]), j)[0]
        if c <= limit:
            score[0, j], worst[0, j] = 0.0, c
    for s in range(1, n):
        for j in range(s + 1, m):
            i = np.arange(s, j)
            c = seg(i, j)
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
    """Min–max balanced contiguous split at module boundaries (the default strategy)."""
    prefix = np.concatenate([[0.0], np.cumsum(graph.weights)])
    cuts = min_max_cuts(prefix, graph.candidates(request.depth), request.n,
                        feasible=memory_feasible(graph, request.memory_cap),
                        inbound=graph.inbound_bytes, slack=request.slack)
    return Assignment.from_cuts(cuts, graph.size, "balanced")


def memory_feasible(graph: TrunkGraph, cap: int | None):
    """``feasible(i, j)``: do positions ``i..j-1`` hold at most ``cap`` parameter bytes?

    Counts the stage's own trunk parameters; the replicated conditioning parameters (the
    time embedding, a few MB at full size) come on top and are reported in the plan.
    """
    if cap is None:
        return None
    pprefix = np.concatenate([[0], np.cumsum(graph.param_bytes)])

    def feasible(i: int, j: int) -> bool:
        return bool(pprefix[j] - pprefix[i] <= cap)
    return feasible


def equal_blocks(graph: TrunkGraph, request: PartitionRequest) -> Assignment:
    """Baseline: the same number of module blocks (at ``depth``) in every stage."""
    if request.memory_cap is not None:
        raise ValueError("memory_cap: not supported by strategy equal_blocks (a fixed "
                         "baseline); allowed with: balanced, shell_core")
    cands = graph.candidates(request.depth)
    blocks = len(cands) + 1
    if request.n > blocks:
        raise ValueError(f"n={request.n} stages but only {blocks} blocks; allowed: n <= {blocks}")
    cuts = [cands[round(j * blocks / request.n) - 1] for j in range(1, request.n)]
    return Assignment.from_cuts(sorted(set(cuts)), graph.size, "equal_blocks")
