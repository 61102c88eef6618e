"""Conditioning: what each stage recomputes every step, and what is computed once per run.

Every compute node that does not depend on the latent (or on another ``per_step`` input) is
*conditioning* (``partition/graph.py``). Two kinds (docs/design.md §2):

* **per-step** conditioning depends on the timestep (the timestep embedding, AdaLN
  modulations, a timestep-scaled RoPE). Each stage that reads it replicates it and computes it
  from the timestep that stage is fed: never sent, never stale. It is part of every such
  stage's per-step work, so it counts in the stage's cost, in the balance and in the plan.
* **hoisted** conditioning depends on neither the latent nor the timestep: text projections,
  a control-image encoder, pooled embeddings, RoPE tables, constants. Its value is the same at
  every step of a sampling run, so it is computed once per run, before the first step, and
  stages read it as an input (``partition/stages.py``: the prologue). A stage's per-step
  closure therefore stops at hoisted nodes.

Cost of a contiguous stage ``[a, b)`` = its trunk nodes + every per-step conditioning node
that one of its trunk nodes needs, each once. ``range_cost`` computes it for all candidate
ranges at once (the same "first use" trick as ``TrunkGraph.inbound_bytes``).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from torch import fx


@dataclass
class Conditioning:
    """Per-step and hoisted conditioning of a trunk graph, with each trunk node's needs."""

    step: list[str]                 # per-step conditioning nodes, execution order
    hoisted: list[str]              # computed once per run, execution order
    weights: dict[str, float]       # cost of each conditioning node under the cost model
    params: dict[str, int]          # parameter elements each conditioning node reads
    param_bytes: dict[str, int]
    needs: list[frozenset[str]]     # per trunk position: the per-step nodes it needs (closure)
    reads: list[frozenset[str]]     # per trunk position: the hoisted nodes it reads (frontier)
    holds: list[frozenset[str]] = field(default_factory=list)  # + every hoisted node behind
    uses: dict[str, np.ndarray] = field(default_factory=dict)  # node -> sorted positions
    held_uses: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.uses = _positions(self.needs)
        self.held_uses = _positions(self.holds or self.needs)

    def step_closure(self, positions: Iterable[int]) -> set[str]:
        """Per-step conditioning nodes a set of trunk positions needs."""
        out: set[str] = set()
        for i in positions:
            out |= self.needs[i]
        return out

    def hoisted_reads(self, positions: Iterable[int]) -> set[str]:
        out: set[str] = set()
        for i in positions:
            out |= self.reads[i]
        return out

    def range_cost(self, q: np.ndarray, size: int, per_node: dict[str, float],
                   held: bool = False) -> np.ndarray:
        """``C[a, j]``: the summed ``per_node`` value of the per-step conditioning a stage
        spanning trunk positions ``q[a] .. q[j]-1`` needs (each node once); ``held``: of every
        conditioning node it may hold, hoisted ones included (an upper bound for memory: a
        hoisted value sent from its home is held there only)."""
        uses = self.held_uses if held else self.uses
        names = [c for c in uses if per_node.get(c, 0)]
        out = np.zeros((len(q), len(q)))
        if not names:
            return out
        w = np.array([per_node[c] for c in names], dtype=np.float64)
        for a, start in enumerate(q):
            first = np.array([_first_at_or_after(uses[c], start, size) for c in names])
            order = np.argsort(first, kind="stable")
            cum = np.concatenate([[0.0], np.cumsum(w[order])])
            out[a] = cum[np.searchsorted(first[order], q, side="left")]
        return np.triu(out, 1)


def _positions(sets: list[frozenset[str]]) -> dict[str, np.ndarray]:
    uses: dict[str, list[int]] = {}
    for i, names in enumerate(sets):
        for c in names:
            uses.setdefault(c, []).append(i)
    return {c: np.array(p, dtype=np.int64) for c, p in uses.items()}


def _first_at_or_after(positions: np.ndarray, start: int, size: int) -> int:
    i = np.searchsorted(positions, start, side="left")
    return int(positions[i]) if i < len(positions) else size + 1


def classify(gm: fx.GraphModule, trunk: set[str], timestep: str | None,
             params: dict[str, int], param_bytes: dict[str, int],
             weights: dict[str, float], trunk_order: list[str]) -> Conditioning:
    """Split the non-trunk compute nodes into per-step and hoisted, and collect what each
    trunk node needs. ``timestep``: the timestep placeholder's node name (None: the model
    takes no timestep, so all of its conditioning is hoisted)."""
    nodes = list(gm.graph.nodes)
    cond = [n for n in nodes if n.op == "call_function" and n.name not in trunk]
    on_t: set[str] = set()
    for n in nodes:  # execution order: inputs are classified before their users
        if (timestep is not None and n.name == timestep) or \
                any(a.name in on_t for a in n.all_input_nodes):
            on_t.add(n.name)
    step = [n.name for n in cond if n.name in on_t]
    hoisted = [n.name for n in cond if n.name not in on_t]
    step_set, hoisted_set = set(step), set(hoisted)
    by_name = {n.name: n for n in nodes}
    closure: dict[str, tuple[frozenset[str], frozenset[str]]] = {}

    def of(name: str) -> tuple[frozenset[str], frozenset[str]]:
        """(per-step nodes, hoisted frontier nodes) that computing ``name`` needs."""
        if name in closure:
            return closure[name]
        need, read = {name}, set()
        for a in by_name[name].all_input_nodes:
            if a.name in step_set:
                s, h = of(a.name)
                need |= s
                read |= h
            elif a.name in hoisted_set:
                read.add(a.name)
        closure[name] = (frozenset(need), frozenset(read))
        return closure[name]

    for name in step:  # memoise in execution order (no deep recursion)
        of(name)
    needs, reads = [], []
    for name in trunk_order:
        need, read = set(), set()
        for a in by_name[name].all_input_nodes:
            if a.name in step_set:
                s, h = closure[a.name]
                need |= s
                read |= h
            elif a.name in hoisted_set:
                read.add(a.name)
        needs.append(frozenset(need))
        reads.append(frozenset(read))
    names = step + hoisted
    behind: dict[str, frozenset[str]] = {}
    for name in hoisted:  # execution order: a node's hoisted inputs come first
        behind[name] = frozenset({name}).union(
            *(behind[a.name] for a in by_name[name].all_input_nodes if a.name in hoisted_set))
    holds = [need.union(*(behind[h] for h in read)) for need, read in zip(needs, reads)]
    return Conditioning(step=step, hoisted=hoisted,
                        weights={c: float(weights.get(c, 0.0)) for c in names},
                        params={c: params.get(c, 0) for c in names},
                        param_bytes={c: param_bytes.get(c, 0) for c in names},
                        needs=needs, reads=reads, holds=holds)


def hoisted_closure(gm: fx.GraphModule, frontier: Iterable[str], hoisted: set[str],
                    stop: set[str] = frozenset()) -> set[str]:
    """Every hoisted node needed to compute the hoisted values ``frontier``, not looking
    behind the values in ``stop`` (they arrive as inputs; a frontier value in ``stop`` is
    not computed at all)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    out: set[str] = set()
    stack = [f for f in frontier if f not in stop]
    while stack:
        name = stack.pop()
        if name in out:
            continue
        out.add(name)
        stack.extend(a.name for a in by_name[name].all_input_nodes
                     if a.name in hoisted and a.name not in stop)
    return out
