"""Materialise an assignment: one GraphModule per segment holding only its own parameters.

A *segment* is a maximal run of trunk nodes on one stage (a contiguous stage has one; the
shell of a shell/core placement has two). Each segment graph holds its trunk nodes plus a
replica of every per-step conditioning node they need (docs/design.md §2: recomputed from the
timestep the stage is fed, never sent), and only the parameters those nodes read. Inputs and
outputs are named by the node names of the captured graph, so values flow between segments by
name.

Conditioning that depends on neither the latent nor the timestep (``partition/conditioning.py``)
is *hoisted*: a stage's **prologue** computes it once per sampling run, and its segments read
the values as inputs. Each hoisted value a stage reads is either computed by that stage's own
prologue (replicated: cheap in memory) or by the prologue of one *home* stage and sent to the
others once per run (when replicating would copy more parameter bytes than the value itself
weighs: a control-image encoder, a text projection). :meth:`StagedModel.prepare` runs every
prologue; the runtime calls it once per run (``asyncdiff/hoisted.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from partition.capture import move_graph
from partition.conditioning import hoisted_closure
from partition.cost import tensor_bytes
from partition.graph import TrunkGraph, static_tensor
from partition.strategies.base import Assignment


@dataclass
class Segment:
    """One piece of one stage: ``outputs = gm(**{name: value for name in inputs})``.

    A prologue segment (``prologue=True``) computes hoisted values once per run."""

    stage: int
    start: int  # trunk positions [start, stop)
    stop: int
    gm: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    conditioning: tuple[str, ...]
    prologue: bool = False

    def __call__(self, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.gm(**{k: env[k] for k in self.inputs})

    def num_params(self) -> int:
        return sum(p.numel() for p in self.gm.parameters())

    def tensors(self) -> list[torch.Tensor]:
        return [*self.gm.parameters(), *self.gm.buffers()]

    def stripped(self) -> "Segment":
        """What a worker process receives: a graph segment already holds only its own."""
        return self

    def to(self, device: torch.device | str) -> "Segment":
        """Move to ``device``: parameters, and the ``device=`` arguments export baked into
        the graph (``arange(..., device=cpu)`` and friends). Already there: nothing (the graph
        is not recompiled under a thread that may be running it)."""
        if getattr(self, "_device", None) != str(torch.device(device)):
            move_graph(self.gm, device)
            self._device = str(torch.device(device))
        return self


@dataclass(frozen=True)
class Hoisted:
    """A hoisted value: ``home`` computes it and sends it once per run to the other
    ``consumers`` (the stages whose prologue or segments need it); ``home`` None: every
    consumer computes it itself (its prologue's output, read by its segments)."""

    name: str
    home: int | None
    consumers: tuple[int, ...]


@dataclass
class StagedModel:
    """All segments in execution order; running them in order equals the captured model."""

    segments: list[Segment]
    output: str  # node name of the noise prediction
    n: int
    specs: tuple = ()  # the model's InputSpecs, in placeholder order
    placeholders: dict = field(default_factory=dict)  # input name -> placeholder node name
    prologues: list[Segment] = field(default_factory=list)  # per stage, once per run
    hoisted: tuple[Hoisted, ...] = ()

    def stage_segments(self, stage: int) -> list[Segment]:
        return [s for s in self.segments if s.stage == stage]

    def stage_parts(self, stage: int) -> list[Segment]:
        """Everything a device running ``stage`` needs: its segments and its prologues."""
        return [*self.stage_segments(stage), *self.stage_prologues(stage)]

    def stage_prologues(self, stage: int) -> list[Segment]:
        """What ``stage`` computes once per run: the sent values if it is their home, then
        its own hoisted values."""
        return [p for p in self.prologues if p.stage == stage]

    def to(self, device: torch.device | str) -> "StagedModel":
        """Every segment and prologue moved to ``device`` (in place)."""
        for seg in [*self.segments, *self.prologues]:
            seg.to(device)
        return self

    def prepare(self, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``env`` (the model inputs) with every hoisted value added: every prologue run once,
        the home's first. A value computed by several prologues is the same computation on
        the same inputs."""
        env = dict(env)
        for p in self.prologues:
            env.update(p(env))
        return env

    def run(self, env: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sequential execution: every segment on fresh values (a warm-up step)."""
        env = self.prepare(env)
        for seg in self.segments:
            env.update(seg(env))
        return env[self.output]


def output_node(gm: fx.GraphModule) -> str:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (value,) = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return value.name


def build_stages(graph: TrunkGraph, assignment: Assignment,
                 placement: tuple[Hoisted, ...] | None = None) -> StagedModel:
    """The segments and prologues of ``assignment``; ``placement``: where the hoisted values
    are computed (a saved plan's; by default :func:`place_hoisted` decides)."""
    gm = graph.captured.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    out_name = output_node(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    segments = []
    reads: dict[int, set[str]] = {}
    for stage, start, stop in assignment.segments():
        own = set(graph.trunk[start:stop])
        positions = range(start, stop)
        needed = graph.cond.step_closure(positions)
        reads.setdefault(stage, set()).update(graph.cond.hoisted_reads(positions))
        body = [n for n in gm.graph.nodes if n.name in own or n.name in needed]
        outputs = []
        for name in graph.trunk[start:stop]:
            users = nodes[name].users
            if any(u.op == "output" or (u.name not in own and u.op != "output") for u in users):
                outputs.append(name)
        segments.append(_segment_module(gm, stage, start, stop, body, outputs,
                                        tuple(sorted(needed, key=order.__getitem__))))
    if placement is None:
        hoisted, home = place_hoisted(graph, reads, assignment)
    else:
        hoisted = placement
        home = next((h.home for h in placement if h.home is not None), None)
    sent = {h.name for h in hoisted if h.home is not None}
    hoisted_set = set(graph.cond.hoisted)
    prologues = []
    if sent:  # the home computes every sent value first (they depend on no received value)
        closure = hoisted_closure(gm, sent, hoisted_set)
        body = [n for n in gm.graph.nodes if n.name in closure]
        prologues.append(_segment_module(gm, home, 0, 0, body, sorted(sent, key=order.get),
                                         tuple(sorted(closure, key=order.__getitem__)),
                                         prologue=True))
    for stage in range(assignment.n):
        computes = sorted(reads.get(stage, set()) - sent, key=order.__getitem__)
        if not computes:
            continue
        closure = hoisted_closure(gm, computes, hoisted_set, stop=sent)
        body = [n for n in gm.graph.nodes if n.name in closure]
        prologues.append(_segment_module(gm, stage, 0, 0, body, computes,
                                         tuple(sorted(closure, key=order.__getitem__)),
                                         prologue=True))
    return StagedModel(segments=segments, output=out_name, n=assignment.n,
                       specs=graph.captured.specs, placeholders=dict(graph.captured.placeholders),
                       prologues=prologues, hoisted=hoisted)


def place_hoisted(graph: TrunkGraph, reads: dict[int, set[str]],
                  assignment: Assignment) -> tuple[tuple[Hoisted, ...], int | None]:
    """Which hoisted values are computed once, on one *home* stage, and sent to the stages
    that need them (once per run), and which each stage computes for itself.

    A value is sent when several stages need it and computing it takes more parameter bytes
    than the value weighs (a text projection, a control-image encoder): replicating it would
    copy those weights into every such stage. Candidates are the last values of what stages
    share (a shared value read by something that is not shared by the same stages), tried from
    the last one back, each charged the parameters not already behind a sent value. One home
    computes every sent value (so no prologue waits on another): the stage with the fewest
    parameter bytes of its own. Returns the values (sent ones with their home, then each
    stage's own reads) and the home."""
    gm = graph.captured.gm
    hoisted_set = set(graph.cond.hoisted)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    n = assignment.n
    need = {s: hoisted_closure(gm, r, hoisted_set) for s, r in reads.items()}
    consumers: dict[str, tuple[int, ...]] = {}
    for c in sorted(set().union(*need.values()) if need else (), key=order.__getitem__):
        consumers[c] = tuple(s for s in range(n) if c in need.get(s, ()))
    shared = {c for c, who in consumers.items() if len(who) > 1}
    candidates = [c for c in shared if static_tensor(nodes[c].meta.get("val"))
                  and any(u.name not in shared or consumers.get(u.name) != consumers[c]
                          for u in nodes[c].users)]
    sent: set[str] = set()
    for c in sorted(candidates, key=order.__getitem__, reverse=True):
        behind = hoisted_closure(gm, [c], hoisted_set, stop=sent - {c})
        params = sum(graph.cond.param_bytes.get(x, 0) for x in behind)
        if params > tensor_bytes(nodes[c].meta.get("val")):
            sent.add(c)
    stage_of = np.asarray(assignment.stage_of)
    own_bytes = {s: int(graph.param_bytes[stage_of == s].sum()) for s in range(n)}
    home = min(range(n), key=lambda s: (own_bytes[s], s)) if sent else None
    out = [Hoisted(c, home, consumers[c]) for c in sorted(sent, key=order.__getitem__)]
    for c in sorted(set().union(*reads.values()) - sent if reads else (), key=order.__getitem__):
        out.append(Hoisted(c, None, tuple(s for s in range(n) if c in reads.get(s, ()))))
    return tuple(out), home


def _segment_module(gm: fx.GraphModule, stage: int, start: int, stop: int, body: list[fx.Node],
                    outputs: list[str], conditioning: tuple[str, ...],
                    prologue: bool = False) -> Segment:
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
        elif a.name not in inside:  # model input, a hoisted value, or another segment's value
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
    kind = "Prologue" if prologue else "Segment"
    module = fx.GraphModule(attrs, graph, class_name=f"Stage{stage}{kind}{start}")
    return Segment(stage=stage, start=start, stop=stop, gm=module, inputs=tuple(inputs),
                   outputs=tuple(outputs), conditioning=conditioning, prologue=prologue)


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
