"""Materialise an assignment: one GraphModule per segment holding only its own parameters.

A *segment* is a maximal run of trunk nodes on one stage (a contiguous stage has one; the
shell of a shell/core placement has two). Each segment graph holds its trunk nodes plus a
replica of every conditioning node they need (DESIGN.md §2: conditioning is recomputed,
never sent), and only the parameters those nodes read. Inputs and outputs are named by the
node names of the captured graph, so values flow between segments by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from partition.capture import move_graph
from partition.graph import TrunkGraph
from partition.strategies.base import Assignment


@dataclass
class Segment:
    """One piece of one stage: ``outputs = gm(**{name: value for name in inputs})``."""

    stage: int
    start: int  # trunk positions [start, stop)
    stop: int
    gm: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    conditioning: tuple[str, ...]

    def __call__(self, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.gm(**{k: env[k] for k in self.inputs})

    def num_params(self) -> int:
        return sum(p.numel() for p in self.gm.parameters())

    def to(self, device: torch.device | str) -> "Segment":
        """Move to ``device``: parameters, and the ``device=`` arguments export baked into
        the graph (``arange(..., device=cpu)`` and friends; research/feasibility.md §5.5)."""
        move_graph(self.gm, device)
        return self


@dataclass
class StagedModel:
    """All segments in execution order; running them in order equals the captured model."""

    segments: list[Segment]
    output: str  # node name of the noise prediction
    n: int
    specs: tuple = ()  # the model's InputSpecs, in placeholder order
    placeholders: dict = field(default_factory=dict)  # input name -> placeholder node name

    def stage_segments(self, stage: int) -> list[Segment]:
        return [s for s in self.segments if s.stage == stage]

    def run(self, env: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sequential execution: every segment on fresh values (a warm-up step)."""
        env = dict(env)
        for seg in self.segments:
            env.update(seg(env))
        return env[self.output]


def output_node(gm: fx.GraphModule) -> str:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (value,) = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return value.name


def build_stages(graph: TrunkGraph, assignment: Assignment) -> StagedModel:
    gm = graph.captured.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    cond_set = set(graph.conditioning)
    out_name = output_node(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    segments = []
    for stage, start, stop in assignment.segments():
        own = set(graph.trunk[start:stop])
        needed_cond: set[str] = set()
        stack = [a for t in own for a in nodes[t].all_input_nodes if a.name in cond_set]
        while stack:
            a = stack.pop()
            if a.name in needed_cond:
                continue
            needed_cond.add(a.name)
            stack.extend(x for x in a.all_input_nodes if x.name in cond_set)
        body = [n for n in gm.graph.nodes if n.name in own or n.name in needed_cond]
        outputs = []
        for name in graph.trunk[start:stop]:
            users = nodes[name].users
            if any(u.op == "output" or (u.name not in own and u.op != "output") for u in users):
                outputs.append(name)
        segments.append(_segment_module(gm, stage, start, stop, body, outputs,
                                        tuple(sorted(needed_cond, key=order.__getitem__))))
    return StagedModel(segments=segments, output=out_name, n=assignment.n,
                       specs=graph.captured.specs, placeholders=dict(graph.captured.placeholders))


def _segment_module(gm: fx.GraphModule, stage: int, start: int, stop: int, body: list[fx.Node],
                    outputs: list[str], conditioning: tuple[str, ...]) -> Segment:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, object] = {}
    inputs: list[str] = []
    inside = {n.name for n in body}

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            attrs[a.target] = _fetch(gm, a.target)
            env[a] = graph.get_attr(a.target)
        elif a.name not in inside:  # model input or a value from another segment
            env[a] = graph.placeholder(a.name)
            env[a].meta = dict(a.meta)
            inputs.append(a.name)
        return env[a]

    # placeholders first: fx requires them at the top of the graph
    for n in body:
        for a in n.all_input_nodes:
            if a.op != "get_attr" and a.name not in inside:
                arg(a)
    for n in body:
        for a in n.all_input_nodes:
            arg(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output({name: env[next(n for n in body if n.name == name)] for name in outputs})
    module = fx.GraphModule(attrs, graph, class_name=f"Stage{stage}Segment{start}")
    return Segment(stage=stage, start=start, stop=stop, gm=module, inputs=tuple(inputs),
                   outputs=tuple(outputs), conditioning=conditioning)


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
