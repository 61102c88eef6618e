"""Automatic search over "shell/core" placements (the paper's SDXL split, generalised).

The last stage (the one emitting ε) holds a prefix ``[0, a)`` and a suffix ``[b, K)`` of
the trunk — for a UNet, the high-resolution outer blocks — and the middle ``[a, b)`` is cut
contiguously into the other ``n-1`` stages. Skip connections between prefix and suffix stay
on one device, which is why the paper's SDXL shell sends ~13x fewer bytes per step than the
best contiguous cut (the official splits). Pairs ``(a, b)`` are tried at module
boundaries of ``shell_depth``; the middle at ``depth``. Every candidate is scored by its
slowest stage and its exact point-to-point bytes; the Pareto front is kept in the notes.
"""
from __future__ import annotations

import numpy as np

from partition.graph import TrunkGraph
from partition.strategies.balanced import memory_feasible, min_max_cuts
from partition.strategies.base import Assignment, PartitionRequest, RequestError


def exact_bytes(graph: TrunkGraph, stage_of: tuple[int, ...] | list[int]) -> int:
    """Bytes sent per step: each trunk value once to every other stage that reads it."""
    total = 0
    k = graph.size
    for i, cons in enumerate(graph.consumers):
        dst = {stage_of[c] for c in cons if c < k} - {stage_of[i]}
        total += len(dst) * int(graph.out_bytes[i])
    return total


def shell_core(graph: TrunkGraph, request: PartitionRequest) -> Assignment:
    n = request.n
    if n < 2:
        raise RequestError(f"shell_core: n={n}; allowed: n >= 2")
    k = graph.size
    coarse = [0, *graph.candidates(request.options.get("shell_depth", 2)), k]
    fine = graph.candidates(request.depth)
    total = float(graph.stage_costs([0] * k, 1)[0])
    slack = float(request.options.get("shell_slack", 0.05))
    results = []  # (max stage cost, bytes, stage_of, a, b)
    for ia, a in enumerate(coarse[:-1]):
        for b in coarse[ia + 1:]:
            if b == k:  # no suffix: the last stage would not emit the output
                continue
            inner = [p for p in fine if a < p < b]
            if len(inner) < n - 2:
                continue
            shell = [*range(a), *range(b, k)]
            if request.memory_cap is not None and _shell_bytes(graph, shell) > request.memory_cap:
                continue
            q = np.array([a, *inner, b], dtype=np.int64)
            cost = graph.stage_cost_matrix(q)
            try:
                cuts = min_max_cuts(cost, q, n - 1,
                                    feasible=memory_feasible(graph, q, request.memory_cap),
                                    inbound=graph.inbound_bytes(q), slack=request.slack)
            except ValueError:
                continue
            bounds = [a, *cuts, b]
            stage_of = [n - 1] * k
            for s in range(n - 1):
                for i in range(bounds[s], bounds[s + 1]):
                    stage_of[i] = s
            worst = float(graph.stage_costs(stage_of, n).max())
            results.append((worst, exact_bytes(graph, stage_of), tuple(stage_of), a, b))
    if not results:
        raise RequestError("shell_core: no placement found" + (
            f" under memory_cap={request.memory_cap}" if request.memory_cap is not None else "")
            + "; try a finer shell_depth or depth")
    best = min(r[0] for r in results)
    within = [r for r in results if r[0] <= best * (1 + slack)]
    chosen = min(within, key=lambda r: (r[1], r[0]))
    front = _pareto(results)
    mean = total / n if total > 0 else 1.0
    notes = [f"shell = [0, {graph.module_at(chosen[3])}) + [{graph.module_at(chosen[4])}, end)"]
    notes += [f"pareto: imbalance {w / mean:.3f}, {b / 2**20:.3f} MiB/step, shell "
              f"[0,{a})+[{bb},{k})" for w, b, _, a, bb in front]
    return Assignment(chosen[2], n, "shell_core", tuple(notes))


def _shell_bytes(graph: TrunkGraph, positions: list[int]) -> int:
    """Parameter bytes the shell may hold: its trunk and the conditioning it replicates or
    computes once per run."""
    held = set().union(*(graph.cond.holds[i] for i in positions)) if positions else set()
    return int(graph.param_bytes[positions].sum()) + sum(graph.cond.param_bytes[c] for c in held)


def _pareto(results):
    front = []
    for r in sorted(results, key=lambda r: (r[0], r[1])):
        if not front or r[1] < front[-1][1]:
            front.append(r)
    return front
