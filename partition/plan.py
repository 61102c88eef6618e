"""The Plan: frozen, JSON round-trip, deterministic data describing a split (docs/design.md §3).

Everything except the ``measured`` block and the ``verification`` record is a deterministic
function of the model, its example inputs and the partition request when the cost model is
deterministic (``flops``, ``fvcore``); ``plan_hash`` covers exactly that part, and workers
compare it before step 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

import torch

from partition.cost import node_module
from partition.graph import TrunkGraph, static_tensor
from partition.spec import InputSpec
from partition.stages import StagedModel
from partition.strategies.base import Assignment

SCHEMA = 2


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
class HoistedPlan:
    """A value computed once per sampling run (``partition/conditioning.py``): by ``home``,
    which sends it to the other ``consumers`` once per run, or (``home`` -1) by every
    consumer itself."""

    name: str
    home: int
    consumers: tuple[int, ...]
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
    params: int              # parameters it alone holds
    replicated_params: int   # parameters it holds that other stages hold too (replicated)
    param_bytes: int         # everything it holds (trunk, conditioning, prologue)
    flops: int               # 2 x MACs per step: trunk + per-step conditioning
    macs: int
    cost: float              # per step under the balancing cost model: trunk + conditioning
    inputs: tuple[str, ...]  # cross-stage values it reads
    outputs: tuple[str, ...]  # cross-stage values it sends
    conditioning: int        # number of per-step conditioning nodes it replicates
    nodes: int
    cond_flops: int = 0      # of ``flops``: the per-step conditioning
    cond_cost: float = 0.0   # of ``cost``: the per-step conditioning
    hoisted_params: int = 0  # of those it holds: used only by its prologue (once per run)
    hoisted_flops: int = 0   # once per run: its prologue
    hoisted: tuple[str, ...] = ()  # hoisted values it reads


@dataclass(frozen=True)
class Round:
    """One round of the stage-level refinement (``partition/refine.py``): the split the cost
    model chose, the stage times it predicted and the stage times measured."""

    cuts: tuple[int, ...]
    predicted_ms: tuple[float, ...]
    measured_ms: tuple[float, ...]
    spread: float | None = None  # largest relative difference between timings of one stage

    @property
    def imbalance(self) -> float:
        return _imbalance(self.measured_ms)

    @property
    def predicted_imbalance(self) -> float:
        return _imbalance(self.predicted_ms)


def _imbalance(ms) -> float:
    mean = sum(ms) / len(ms)
    return max(ms) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class Measured:
    """Timing-dependent numbers: excluded from the hash (they differ run to run)."""

    stage_ms: tuple[float, ...]
    total_ms: float  # the sequential step (prediction's t_full), timed as stage_ms was
    threads: int
    repeats: int
    device: str = "cpu"  # where the nodes were timed
    source: str = "modules"  # stage_ms: "stages" (the stages themselves, timed) or "modules"
    #   (the summed module times)
    step_source: str = "modules"  # total_ms: "stages" (from the stages' own timing, less
    #   the conditioning they replicate: partition.verify) or "modules" (the summed module
    #   times; a plan saved before step_source existed says "modules" whatever its source)
    clock: str = "wall"      # how the times were read (partition.timing.clock_name)
    predicted_ms: tuple[float, ...] = ()  # the cost model's stage times for this split
    spread: float | None = None  # largest relative difference between timings of one stage
    rounds: tuple[Round, ...] = ()  # the stage-level refinement's rounds, in order
    outcome: str = ""        # how the refinement ended (partition/refine.py)


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
    total_flops: int          # every node once: one step plus the hoisted conditioning
    total_params: int
    notes: tuple[str, ...] = ()
    uncounted_ops: tuple[tuple[str, int], ...] = ()
    versions: tuple[tuple[str, str], ...] = ()
    measured: Measured | None = None
    schema: int = SCHEMA
    backend: str = "graph"    # "graph" (torch.export) or "module" (the network's own blocks)
    output_shape: tuple[int, ...] = ()
    output_dtype: str = "float32"
    hoisted: tuple[HoistedPlan, ...] = ()
    hoisted_bytes_per_run: int = 0
    verification: str = ""    # what the compile checked on its example inputs (verify.py)
    step_flops: int = 0       # one sequential step: every per-step node once (not hoisted)
    blocks: tuple[str, ...] = ()  # module backend: the block calls stages own, in order

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
        """Slowest over mean of the measured stage times (None: not timed)."""
        return None if self.measured is None else _imbalance(self.measured.stage_ms)

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self, measured: bool = True) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = [s.to_dict() for s in self.inputs]
        if not measured:  # what this compile measured and checked, not what the split is
            d.pop("measured")
            d.pop("verification")
            d.pop("model")  # a label: the architecture is config_hash (two names, one split)
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
        d["stages"] = tuple(dataclasses.replace(st, hoisted=tuple(st.hoisted))
                            for st in d["stages"])
        d["hoisted"] = tuple(HoistedPlan(**{**h, "consumers": tuple(h["consumers"]),
                                            "shape": tuple(h["shape"])})
                             for h in d.get("hoisted", ()))
        d["output_shape"] = tuple(d.get("output_shape", ()))
        d["blocks"] = tuple(d.get("blocks", ()))
        d["uncounted_ops"] = tuple(tuple(x) for x in d.get("uncounted_ops", ()))
        d["versions"] = tuple(tuple(x) for x in d.get("versions", ()))
        m = d.get("measured")
        d["measured"] = Measured(**{
            **m, "stage_ms": tuple(m["stage_ms"]),
            "predicted_ms": tuple(m.get("predicted_ms", ())),
            "rounds": tuple(Round(**{**r, "cuts": tuple(r["cuts"]),
                                     "predicted_ms": tuple(r["predicted_ms"]),
                                     "measured_ms": tuple(r["measured_ms"])})
                            for r in m.get("rounds", ()))}) if m else None
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
              config_hash: str, cost_model: str, depth: int | None,
              verification: str = "", measured: Measured | None = None) -> Plan:
    """Describe a materialised split: per-stage costs, parameters, crossing and hoisted values.

    ``measured``: the stages' own times (``partition.verify``, ``partition.refine``); without
    it, with measured module times (``cost_model=time``), the summed module times of the
    nodes."""
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
                                    shape=_shape(val), dtype=_dtype(val),
                                    bytes=int(graph.out_bytes[i]), module=graph.modules[i]))
    hoisted = []
    for h in staged.hoisted:
        val = nodes[h.name].meta.get("val")
        hoisted.append(HoistedPlan(
            name=h.name, home=-1 if h.home is None else h.home, consumers=h.consumers,
            shape=_shape(val) if static_tensor(val) else (),
            dtype=_dtype(val) if isinstance(val, torch.Tensor) else type(val).__name__,
            bytes=int(costs.out_bytes.get(h.name, 0)), module=node_module(nodes[h.name])))
    weights = graph.cond.weights
    hoisted_nodes = set(graph.cond.hoisted)
    held_by = {s: _held(staged, s) for s in range(n)}
    holders: dict[str, int] = {}
    for held in held_by.values():
        for key in held:
            holders[key] = holders.get(key, 0) + 1
    stages = []
    for s in range(n):
        segs = staged.stage_segments(s)
        prologues = staged.stage_prologues(s)
        own = [i for i in range(k) if stage_of[i] == s]
        cond = sorted({c for sg in segs for c in sg.conditioning})
        trunk_flops = int(sum(costs.flops.get(graph.trunk[i], 0) for i in own))
        cond_flops = int(sum(costs.flops.get(c, 0) for c in cond))
        held = held_by[s]
        shared = sum(t.numel() for key, t in held.items() if holders[key] > 1)
        pro_params = {key for p in prologues for key, _ in p.gm.named_parameters()}
        step_params = {key for sg in segs for key, _ in sg.gm.named_parameters()}
        hoisted_params = sum(held[key].numel() for key in pro_params - step_params)
        cond_cost = float(sum(weights[c] for c in cond))
        stages.append(StagePlan(
            index=s,
            segments=tuple(SegmentPlan(sg.start, sg.stop, graph.trunk[sg.start],
                                       graph.trunk[sg.stop - 1], graph.modules[sg.start],
                                       graph.modules[sg.stop - 1]) for sg in segs),
            params=int(sum(t.numel() for t in held.values()) - shared),
            replicated_params=int(shared),
            param_bytes=int(sum(p.numel() * p.element_size() for p in held.values())),
            flops=trunk_flops + cond_flops, macs=(trunk_flops + cond_flops) // 2,
            cost=float(graph.weights[own].sum()) + cond_cost,
            inputs=tuple(v.name for v in values if s in v.consumers),
            outputs=tuple(v.name for v in values if v.producer == s),
            conditioning=len(cond), nodes=len(own), cond_flops=cond_flops, cond_cost=cond_cost,
            hoisted_params=int(hoisted_params),
            hoisted_flops=int(sum(costs.flops.get(c, 0) for p in prologues for c in p.conditioning)),
            hoisted=tuple(h.name for h in staged.hoisted if s in h.consumers)))
    out_name = staged.output
    out_val = nodes[out_name].meta.get("val")
    if not static_tensor(out_val):  # a data-dependent shape: the one the example gave
        out_val = costs.captured if costs.captured is not None else costs.eager
    if out_val is None:
        raise ValueError(f"the prediction {out_name!r} has a shape that depends on the data and "
                         "no example value was computed to fix it")
    out_bytes = int(out_val.numel() * out_val.element_size())
    if measured is None and costs.ms:
        stage_ms = tuple(round(sum(costs.ms.get(graph.trunk[i], 0.0) for i in range(k)
                                   if stage_of[i] == s)
                               + sum(costs.ms.get(c, 0.0) for sg in staged.stage_segments(s)
                                     for c in sg.conditioning), 4) for s in range(n))
        measured = Measured(stage_ms=stage_ms, total_ms=round(sum(costs.ms.values()), 4),
                            threads=costs.threads, repeats=costs.repeats, device=costs.device,
                            clock=costs.clock)
    return Plan(
        model=model, config_hash=config_hash, graph_hash=graph.captured.graph_hash(),
        inputs=graph.captured.specs, n=n, strategy=assignment.strategy, cost_model=cost_model,
        depth=depth, stages=tuple(stages), values=tuple(values), output=out_name,
        output_bytes=out_bytes, **totals(stages, values, out_bytes),
        total_flops=int(sum(costs.flops.values())),
        total_params=int(sum(p.numel() for p in gm.parameters())),
        notes=assignment.notes, uncounted_ops=tuple(sorted(costs.uncounted.items())),
        versions=_versions(), measured=measured, output_shape=_shape(out_val),
        output_dtype=_dtype(out_val), hoisted=tuple(hoisted),
        hoisted_bytes_per_run=int(sum(h.bytes * (len(h.consumers) - 1) for h in hoisted
                                      if h.home >= 0)),
        verification=verification,
        step_flops=int(sum(v for name, v in costs.flops.items() if name not in hoisted_nodes)))


def totals(stages, values, output_bytes: int) -> dict:
    """The plan-level figures both backends derive alike from their stages and crossing
    values: imbalance under the cost model and in FLOPs (max / mean), and the bytes crossing
    per step (each value to each consumer stage, ε to every other stage)."""
    cost = np.array([st.cost for st in stages])
    fl = np.array([st.flops for st in stages], dtype=np.float64)
    return {"imbalance": round(float(cost.max() / cost.mean()), 6) if cost.mean() > 0 else 1.0,
            "flops_imbalance": round(float(fl.max() / fl.mean()), 6) if fl.mean() > 0 else 1.0,
            "bytes_per_step": int(sum(v.bytes * len(v.consumers) for v in values)
                                  + output_bytes * (len(stages) - 1))}


def _held(staged: StagedModel, stage: int) -> dict:
    """Parameters a stage holds, by name (a shell stage's two segments share theirs)."""
    mods = [*staged.stage_segments(stage), *staged.stage_prologues(stage)]
    return {key: t for m in mods for key, t in m.gm.named_parameters()}


def _shape(val) -> tuple[int, ...]:
    return tuple(int(d) for d in val.shape)


def _dtype(val) -> str:
    return str(val.dtype).removeprefix("torch.")


def architecture_hash(module) -> str | None:
    """sha256 of a model's class and public config (a diffusers model's ``config``, without
    the ``_name_or_path``-style keys loading adds): the same for a model built from its config
    by the command line and one a pipeline loaded, whatever the weights. ``None`` for a model
    without a config."""
    config = getattr(module, "config", None)
    if not isinstance(config, Mapping):
        return None
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    text = json.dumps({"class": type(module).__qualname__, "config": public}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()
