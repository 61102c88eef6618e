"""The captured graph as data: trunk vs conditioning, costs, and what crosses every cut.

The *trunk* is every compute node that depends on the latent input (or on another input of
role ``per_step``); it is what gets cut into stages. Every other compute node is
*conditioning* (timestep embedding, text projections, added conditions, RoPE tables): it
depends only on inputs every device holds, so it is never sent (docs/design.md §2). Per-step
conditioning is replicated into each stage that uses it; conditioning that depends on neither
the latent nor the timestep is computed once per run (``partition/conditioning.py``).

Positions: trunk node ``i`` sits at position ``i``; cut position ``p`` (0 < p < K) is the
boundary between trunk nodes ``p-1`` and ``p``. The graph's output counts as a consumer at
position ``K``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np
import torch
from torch import fx

from partition.capture import Captured
from partition.conditioning import Conditioning, classify
from partition.cost import NodeCosts, node_module


@dataclass
class TrunkGraph:
    """Trunk nodes in execution order with costs, parameters and last uses."""

    captured: Captured
    costs: NodeCosts
    nx: nx.DiGraph
    trunk: list[str]
    conditioning: list[str]  # every non-trunk compute node (per-step and hoisted)
    cond: Conditioning       # which conditioning is per step, which hoisted; who needs what
    weights: np.ndarray     # cost of each trunk node under the chosen cost model
    param_count: np.ndarray
    param_bytes: np.ndarray
    modules: list[str]      # innermost module path of each trunk node
    consumers: list[tuple[int, ...]]  # trunk positions that read node i (K = the output)
    out_bytes: np.ndarray
    is_tensor: np.ndarray

    @cached_property
    def pos(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.trunk)}

    @property
    def size(self) -> int:
        return len(self.trunk)

    @cached_property
    def last_use(self) -> np.ndarray:
        return np.array([max(c) if c else i for i, c in enumerate(self.consumers)], dtype=np.int64)

    @cached_property
    def live_bytes(self) -> np.ndarray:
        """Bytes of trunk values alive across each cut position 0..K (0 and K are empty)."""
        k = self.size
        diff = np.zeros(k + 2, dtype=np.int64)
        for i in range(k):
            lu = self.last_use[i]
            if lu > i:
                diff[i + 1] += self.out_bytes[i]
                diff[min(lu, k) + 1] -= self.out_bytes[i]
        live = np.cumsum(diff)[: k + 1]
        live[0] = live[k] = 0
        return live

    @cached_property
    def cuttable(self) -> np.ndarray:
        """Cut positions where every value crossing is a single tensor of static shape (not a
        tuple, not ``nonzero``'s data-dependent length)."""
        k = self.size
        bad = np.zeros(k + 2, dtype=np.int64)
        for i in range(k):
            if not self.is_tensor[i] and self.last_use[i] > i:
                bad[i + 1] += 1
                bad[min(self.last_use[i], k) + 1] -= 1
        ok = np.cumsum(bad)[: k + 1] == 0
        ok[0] = ok[k] = True
        return ok

    def inbound_bytes(self, q: np.ndarray) -> np.ndarray:
        """``B[a, j]``: bytes a stage spanning positions ``q[a] .. q[j]-1`` receives.

        Exact for contiguous stages: each value produced before ``q[a]`` and read inside the
        stage is sent to it once (the point-to-point rule), however many cuts it spans.
        ``q`` are sorted positions including 0 and K; entries with ``j <= a`` are 0.
        """
        k = self.size
        width = max((len(c) for c in self.consumers), default=0) or 1
        cons = np.full((k, width), np.iinfo(np.int64).max, dtype=np.int64)
        for i, c in enumerate(self.consumers):
            inner = [x for x in c if x < k]  # the output is ε, sent separately
            cons[i, :len(inner)] = inner
        pos = np.arange(k)
        out = np.zeros((len(q), len(q)))
        for a, start in enumerate(q):
            before = pos < start
            first = np.where(cons[before] >= start, cons[before], np.iinfo(np.int64).max).min(axis=1)
            keep = first < k
            order = np.argsort(first[keep], kind="stable")
            f = first[keep][order]
            cum = np.concatenate([[0], np.cumsum(self.out_bytes[before][keep][order])])
            out[a] = cum[np.searchsorted(f, q, side="left")]
        return np.triu(out, 1)

    def stage_cost_matrix(self, q: np.ndarray) -> np.ndarray:
        """``C[a, j]``: per-step cost of a stage spanning ``q[a] .. q[j]-1``: its trunk nodes
        plus the per-step conditioning it replicates (each node once)."""
        prefix = np.concatenate([[0.0], np.cumsum(self.weights)])
        trunk = np.triu(prefix[q][None, :] - prefix[q][:, None], 1)
        return trunk + self.cond.range_cost(q, self.size, self.cond.weights)

    def stage_param_matrix(self, q: np.ndarray) -> np.ndarray:
        """``P[a, j]``: parameter bytes a stage spanning ``q[a] .. q[j]-1`` may hold: its own
        trunk parameters plus those of the conditioning it replicates or computes once per
        run (an upper bound: a value sent from its home stage is held there only)."""
        prefix = np.concatenate([[0], np.cumsum(self.param_bytes)]).astype(np.float64)
        trunk = np.triu(prefix[q][None, :] - prefix[q][:, None], 1)
        per_node = {k: float(v) for k, v in self.cond.param_bytes.items()}
        return trunk + self.cond.range_cost(q, self.size, per_node, held=True)

    def stage_costs(self, stage_of, n: int) -> np.ndarray:
        """Per-step cost of each stage of any assignment (trunk + its per-step conditioning)."""
        so = np.asarray(stage_of)
        out = np.zeros(n)
        for s in range(n):
            own = np.flatnonzero(so == s)
            out[s] = self.weights[own].sum() + sum(
                self.cond.weights[c] for c in self.cond.step_closure(own))
        return out

    def crossing(self, p: int) -> list[str]:
        """Trunk values produced before cut ``p`` and read at or after it."""
        return [self.trunk[i] for i in range(p) if self.last_use[i] >= p]

    def candidates(self, depth: int | None) -> list[int]:
        """Inner cut positions at module boundaries of the given depth (None: every node).

        A boundary at depth ``d`` is where the first ``d`` components of the module path
        change, e.g. depth 2 separates ``down_blocks.0`` from ``down_blocks.1`` and depth 4
        separates ``up_blocks.1.resnets.0`` from ``up_blocks.1.attentions.0``.
        """
        out = []
        for p in range(1, self.size):
            if not self.cuttable[p]:
                continue
            if depth is None or _prefix(self.modules[p - 1], depth) != _prefix(self.modules[p], depth):
                out.append(p)
        return out

    def module_at(self, p: int) -> str:
        return self.modules[p] if p < self.size else "<output>"


def _prefix(path: str, depth: int) -> str:
    return ".".join(path.split(".")[:depth]) if path else ""


def build_graph(captured: Captured, costs: NodeCosts, cost_model: str) -> TrunkGraph:
    """Classify nodes into trunk and conditioning and collect what the partitioner needs."""
    gm = captured.gm
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=str(n.target), module=node_module(n),
                   flops=costs.flops.get(n.name, 0), ms=costs.ms.get(n.name, 0.0),
                   bytes=costs.out_bytes.get(n.name, 0))
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    roots = [captured.placeholders[s.name] for s in captured.specs
             if s.role in ("latent", "per_step")]
    trunk_set = set().union(*(nx.descendants(g, r) for r in roots))
    weights_all = costs.weights(cost_model)
    nodes = {n.name: n for n in gm.graph.nodes}
    trunk = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.name in trunk_set]
    cond = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.name not in trunk_set]
    pos = {name: i for i, name in enumerate(trunk)}
    k = len(trunk)
    node_params, node_bytes = _node_params(gm)
    pc = np.array([node_params.get(name, 0) for name in trunk], dtype=np.int64)
    pb = np.array([node_bytes.get(name, 0) for name in trunk], dtype=np.int64)
    consumers, modules, out_b, is_t = [], [], np.zeros(k, dtype=np.int64), np.zeros(k, dtype=bool)
    for i, name in enumerate(trunk):
        n = nodes[name]
        users = []
        for u in n.users:
            if u.op == "output":
                users.append(k)
            elif u.name in pos:
                users.append(pos[u.name])
        consumers.append(tuple(sorted(set(users))))
        modules.append(node_module(n))
        out_b[i] = costs.out_bytes.get(name, 0)
        is_t[i] = static_tensor(n.meta.get("val"))
    w = np.array([float(weights_all.get(name, 0.0)) for name in trunk], dtype=np.float64)
    timestep = next((captured.placeholders[s.name] for s in captured.specs
                     if s.role == "timestep"), None)
    conditioning = classify(gm, trunk_set, timestep, node_params, node_bytes, weights_all, trunk)
    return TrunkGraph(captured=captured, costs=costs, nx=g, trunk=trunk, conditioning=cond,
                      cond=conditioning, weights=w, param_count=pc, param_bytes=pb,
                      modules=modules, consumers=consumers, out_bytes=out_b, is_tensor=is_t)


def static_tensor(val) -> bool:
    """A tensor whose shape does not depend on data: the only kind a cut can carry (the
    receiver allocates its buffer from the plan)."""
    return isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape)


def _node_params(gm: fx.GraphModule) -> tuple[dict[str, int], dict[str, int]]:
    """Parameter elements and parameter+buffer bytes each compute node reads."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    count: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                t = params.get(a.target, buffers.get(a.target))
                if t is None:
                    t = _fetch_attr(gm, a.target)
                if isinstance(t, torch.Tensor):
                    count[n.name] = count.get(n.name, 0) + (t.numel() if a.target in params else 0)
                    nbytes[n.name] = nbytes.get(n.name, 0) + t.numel() * t.element_size()
    return count, nbytes


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
