"""The Plan: frozen, JSON round-trip, deterministic data describing a split (DESIGN.md §3).

Everything except the ``measured`` block is a deterministic function of the model, its
example inputs and the partition request when the cost model is deterministic (``flops``,
``fvcore``); ``plan_hash`` covers exactly that part, and workers compare it before step 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from dataclasses import dataclass, field

import numpy as np

from partition.graph import TrunkGraph
from partition.spec import InputSpec
from partition.stages import StagedModel
from partition.strategies.base import Assignment

SCHEMA = 1


@dataclass(frozen=True)
class ValuePlan:
    """A cross-stage value: produced on one stage, sent point-to-point to the others."""

    name: str
    producer: int
    consumers: tuple[int, ...]
    position: int  # trunk position of the producing node (execution order)
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    module: str


@dataclass(frozen=True)
class SegmentPlan:
    start: int
    stop: int
    first_node: str
    last_node: str
    first_module: str
    last_module: str


@dataclass(frozen=True)
class StagePlan:
    index: int
    segments: tuple[SegmentPlan, ...]
    params: int              # parameters of its own trunk nodes
    replicated_params: int   # parameters of the conditioning nodes it replicates
    param_bytes: int
    flops: int               # 2 x MACs, trunk + replicated conditioning
    macs: int
    cost: float              # under the balancing cost model, trunk only
    inputs: tuple[str, ...]  # cross-stage values it reads
    outputs: tuple[str, ...]  # cross-stage values it sends
    conditioning: int        # number of replicated conditioning nodes
    nodes: int


@dataclass(frozen=True)
class Measured:
    """Timing-dependent numbers: excluded from the hash (they differ run to run)."""

    stage_ms: tuple[float, ...]
    total_ms: float
    threads: int
    repeats: int
    device: str = "cpu"  # where the nodes were timed


@dataclass(frozen=True)
class Plan:
    model: str
    config_hash: str
    graph_hash: str
    inputs: tuple[InputSpec, ...]
    n: int
    strategy: str
    cost_model: str
    depth: int | None
    stages: tuple[StagePlan, ...]
    values: tuple[ValuePlan, ...]
    output: str
    output_bytes: int
    imbalance: float          # max / mean stage cost under the balancing cost model
    flops_imbalance: float
    bytes_per_step: int       # cross-stage values (point-to-point) + ε to every other stage
    total_flops: int
    total_params: int
    notes: tuple[str, ...] = ()
    uncounted_ops: tuple[tuple[str, int], ...] = ()
    versions: tuple[tuple[str, str], ...] = ()
    measured: Measured | None = None
    schema: int = SCHEMA

    # --- derived -------------------------------------------------------------------------
    def stage_of(self) -> tuple[int, ...]:
        size = max(s.stop for st in self.stages for s in st.segments)
        out = [0] * size
        for st in self.stages:
            for seg in st.segments:
                out[seg.start:seg.stop] = [st.index] * (seg.stop - seg.start)
        return tuple(out)

    def assignment(self) -> Assignment:
        return Assignment(self.stage_of(), self.n, self.strategy, self.notes)

    @property
    def time_imbalance(self) -> float | None:
        if self.measured is None:
            return None
        ms = self.measured.stage_ms
        return max(ms) / (sum(ms) / len(ms))

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self, measured: bool = True) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = [s.to_dict() for s in self.inputs]
        if not measured:
            d.pop("measured")
        return d

    def to_json(self, measured: bool = True) -> str:
        return json.dumps(self.to_dict(measured), sort_keys=True, indent=1) + "\n"

    @property
    def plan_hash(self) -> str:
        return hashlib.sha256(self.to_json(measured=False).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        if d.get("schema") != SCHEMA:
            raise ValueError(f"plan schema={d.get('schema')!r}; allowed: {SCHEMA}")
        d["inputs"] = tuple(InputSpec.from_dict(s) for s in d["inputs"])
        d["stages"] = tuple(
            StagePlan(**{**st, "segments": tuple(SegmentPlan(**sg) for sg in st["segments"]),
                         "inputs": tuple(st["inputs"]), "outputs": tuple(st["outputs"])})
            for st in d["stages"])
        d["values"] = tuple(ValuePlan(**{**v, "consumers": tuple(v["consumers"]),
                                         "shape": tuple(v["shape"])}) for v in d["values"])
        d["notes"] = tuple(d.get("notes", ()))
        d["uncounted_ops"] = tuple(tuple(x) for x in d.get("uncounted_ops", ()))
        d["versions"] = tuple(tuple(x) for x in d.get("versions", ()))
        m = d.get("measured")
        d["measured"] = Measured(**{**m, "stage_ms": tuple(m["stage_ms"])}) if m else None
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def _versions() -> tuple[tuple[str, str], ...]:
    import torch
    out = [("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import diffusers
        out.append(("diffusers", diffusers.__version__))
    except ImportError:  # pragma: no cover
        pass
    return tuple(out)


def make_plan(graph: TrunkGraph, assignment: Assignment, staged: StagedModel, *, model: str,
              config_hash: str, cost_model: str, depth: int | None) -> Plan:
    """Describe a materialised split: per-stage costs, parameters and crossing values."""
    from partition.validate import validate_assignment

    validate_assignment(graph, assignment)
    gm = graph.captured.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    costs = graph.costs
    n = assignment.n
    stage_of = assignment.stage_of
    k = graph.size
    values = []
    for i, cons in enumerate(graph.consumers):
        dst = tuple(sorted({stage_of[c] for c in cons if c < k} - {stage_of[i]}))
        if dst:
            name = graph.trunk[i]
            val = nodes[name].meta.get("val")
            values.append(ValuePlan(name=name, producer=stage_of[i], consumers=dst, position=i,
                                    shape=tuple(val.shape), dtype=str(val.dtype).removeprefix("torch."),
                                    bytes=int(graph.out_bytes[i]), module=graph.modules[i]))
    stages = []
    for s in range(n):
        segs = staged.stage_segments(s)
        own = [i for i in range(k) if stage_of[i] == s]
        cond = sorted({c for sg in segs for c in sg.conditioning})
        flops = int(sum(costs.flops.get(graph.trunk[i], 0) for i in own)
                    + sum(costs.flops.get(c, 0) for c in cond))
        # by name: a shell stage's two segments both replicate the conditioning they read
        held = {k: p for sg in segs for k, p in sg.gm.named_parameters()}
        total_params = sum(p.numel() for p in held.values())
        own_params = int(graph.param_count[own].sum())
        stages.append(StagePlan(
            index=s,
            segments=tuple(SegmentPlan(sg.start, sg.stop, graph.trunk[sg.start],
                                       graph.trunk[sg.stop - 1], graph.modules[sg.start],
                                       graph.modules[sg.stop - 1]) for sg in segs),
            params=own_params, replicated_params=int(total_params - own_params),
            param_bytes=int(sum(p.numel() * p.element_size() for p in held.values())),
            flops=flops, macs=flops // 2, cost=float(graph.weights[own].sum()),
            inputs=tuple(v.name for v in values if s in v.consumers),
            outputs=tuple(v.name for v in values if v.producer == s),
            conditioning=len(cond), nodes=len(own)))
    cost = np.array([st.cost for st in stages])
    fl = np.array([st.flops for st in stages], dtype=np.float64)
    out_name = staged.output
    out_val = nodes[out_name].meta.get("val")
    out_bytes = int(out_val.numel() * out_val.element_size())
    measured = None
    if costs.ms:
        stage_ms = []
        for s in range(n):
            own = [graph.trunk[i] for i in range(k) if stage_of[i] == s]
            cond = {c for sg in staged.stage_segments(s) for c in sg.conditioning}
            stage_ms.append(round(sum(costs.ms.get(x, 0.0) for x in own)
                                  + sum(costs.ms.get(x, 0.0) for x in cond), 4))
        measured = Measured(stage_ms=tuple(stage_ms), total_ms=round(sum(costs.ms.values()), 4),
                            threads=costs.threads, repeats=costs.repeats, device=costs.device)
    return Plan(
        model=model, config_hash=config_hash, graph_hash=graph.captured.graph_hash(),
        inputs=graph.captured.specs, n=n, strategy=assignment.strategy, cost_model=cost_model,
        depth=depth, stages=tuple(stages), values=tuple(values), output=out_name,
        output_bytes=out_bytes,
        imbalance=round(float(cost.max() / cost.mean()), 6) if cost.mean() > 0 else 1.0,
        flops_imbalance=round(float(fl.max() / fl.mean()), 6) if fl.mean() > 0 else 1.0,
        bytes_per_step=int(sum(v.bytes * len(v.consumers) for v in values) + out_bytes * (n - 1)),
        total_flops=int(sum(costs.flops.values())),
        total_params=int(sum(p.numel() for p in gm.parameters())),
        notes=assignment.notes, uncounted_ops=tuple(sorted(costs.uncounted.items())),
        versions=_versions(), measured=measured)
