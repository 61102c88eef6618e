"""The Plan of a module-backend split: the same type the graph backend makes (docs/design.md §3),
with ``backend="module"`` and the costs particular to it in its notes."""
from __future__ import annotations

import torch

from partition.modular.blocks import BlockGraph
from partition.modular.segment import OUTPUT
from partition.plan import (Measured, Plan, SegmentPlan, StagePlan, ValuePlan, _versions,
                            totals)
from partition.stages import StagedModel
from partition.strategies.base import Assignment
from partition.timing import clock_name


def make_module_plan(graph: BlockGraph, a: Assignment, staged: StagedModel, *, model: str,
                     config_hash: str, depth, verification: str,
                     stage_ms: tuple[float, ...] | None, step_ms: float | None = None,
                     repeats: int = 1, note: str = "", refined=None) -> Plan:
    n, k = a.n, graph.size
    values = []
    for i in range(k):
        u = graph.unit(i)
        owner = a.stage_of[i]
        # every later stage runs the glue that reads it (no graph says which do)
        consumers = tuple(range(owner + 1, n))
        if not consumers:
            continue
        for j, leaf in enumerate(u.leaves):
            if isinstance(leaf, torch.Tensor):
                values.append(ValuePlan(name=f"{u.name}.{j}", producer=owner,
                                        consumers=consumers, position=i,
                                        shape=tuple(leaf.shape),
                                        dtype=str(leaf.dtype).removeprefix("torch."),
                                        bytes=leaf.numel() * leaf.element_size(), module=u.path))
    glue_params = _glue_params(graph)
    stages = []
    for s, start, stop in a.segments():
        seg = staged.segments[s]
        own = sum(p.numel() for i in range(start, stop) for p in graph.unit_params(i).values())
        flops = int(sum(graph.unit(i).flops for i in range(start, stop)) + graph.glue_flops)
        stages.append(StagePlan(
            index=s, segments=(SegmentPlan(start, stop, graph.unit(start).name,
                                           graph.unit(stop - 1).name, graph.unit(start).path,
                                           graph.unit(stop - 1).path),),
            params=int(own), replicated_params=int(glue_params),
            param_bytes=int(sum(t.numel() * t.element_size() for t in seg.tensors())),
            flops=flops, macs=flops // 2,
            cost=float(graph.weights[start:stop].sum() + graph.glue_cost),
            inputs=tuple(v.name for v in values if s in v.consumers),
            outputs=tuple(v.name for v in values if v.producer == s),
            conditioning=0, nodes=stop - start, cond_flops=int(graph.glue_flops),
            cond_cost=float(graph.glue_cost)))
    root = next(c for c in graph.calls if c.parent is None)
    eps = graph.output
    measured = None
    if graph.ms_measured:  # as the graph backend: timings only with the time cost model
        timed = stage_ms is not None and step_ms is not None
        predicted = tuple(float(graph.weights[st.segments[0].start:st.segments[0].stop].sum()
                                + graph.glue_cost) for st in stages)
        measured = Measured(stage_ms=tuple(stage_ms) if timed else predicted,
                            total_ms=round(step_ms if timed else root.ms, 4),
                            threads=graph.threads, repeats=repeats if timed else 1,
                            device=str(eps.device), source="stages" if timed else "modules",
                            step_source="stages" if timed else "modules",
                            clock=clock_name(graph.threads, eps.is_cuda),
                            predicted_ms=refined.predicted_ms if refined else predicted,
                            rounds=refined.rounds if refined else (),
                            outcome=refined.outcome if refined else "")
    glue_share = graph.glue_flops / graph.total_flops if graph.total_flops else 0.0
    notes = [f"module backend: {k} blocks run eagerly; the glue between them "
             f"({graph.glue_flops / 1e9:.4f} GFLOPs, {glue_share:.1%} of a step) runs on every "
             f"device, and each block's outputs go to every later stage"]
    if note:
        notes.append(note)
    return Plan(
        model=model, config_hash=config_hash, graph_hash=graph.graph_hash(), inputs=graph.specs,
        n=n, strategy=a.strategy, cost_model=graph.cost_model, depth=depth,
        stages=tuple(stages), values=tuple(values), output=OUTPUT,
        output_bytes=eps.numel() * eps.element_size(),
        **totals(stages, values, eps.numel() * eps.element_size()),
        total_flops=int(graph.total_flops), total_params=sum(p.numel() for p in
                                                             graph.model.parameters()),
        notes=tuple(notes), versions=_versions(), measured=measured, backend="module",
        output_shape=tuple(eps.shape), output_dtype=str(eps.dtype).removeprefix("torch."),
        verification=verification, step_flops=int(graph.total_flops),
        blocks=tuple(graph.unit(i).name for i in range(k)))


def _glue_params(graph: BlockGraph) -> int:
    """Parameters outside every unit: every stage holds them (the glue runs everywhere)."""
    in_units = {id(p) for i in range(graph.size) for p in graph.unit_params(i).values()}
    return sum(p.numel() for p in graph.model.parameters() if id(p) not in in_units)
