"""Lowering: the one function that decides what travels between ranks.

``lower(timeline, plan, groups=…, replicas=…)`` turns the timeline (who runs what, on which
round's values), the plan (which values cross which stage boundary, their shapes and dtypes,
what is hoisted) and the world's layout (guidance groups, replicas) into every rank's ordered
program: compute steps and communication groups, round by round. The distributed executor
interprets it (``asyncdiff/distributed/executor.py``), the emulator counts its bytes from it,
``asyncdiff-plan … print_comm=true`` prints it, and :func:`asyncdiff.lowering.simulate.check`
replays it under NCCL's rules before anything is posted.

# [Note: lowering]
# ~~~~~~~~~~~~~~~~
# NCCL ignores tags; the operations between two ranks run in the order they were posted, on
# one stream; a receive holds that stream until the peer's matching send runs (docs/design.md,
# "Communication"). So a rank never posts a lone receive that its peer answers only after
# a receive of its own: every exchange of a round is posted as one group
# (``batch_isend_irecv``: NCCL fuses it, its operations progress together), and both ends of
# every pair derive the same messages in the same order from the same data. Tags are never
# needed: the k-th message from A to B is the k-th receive B posts from A.
#
# * A sequential round (warm-up, sync, cool-down) runs the segments in global execution
#   order, each on its stage's device, on fresh values: a value must arrive before the
#   segment that reads it computes. So the round is cut into phases, one per segment q: the
#   device that ran q sends what q produced to the devices of the stages that read it
#   (``fresh q``), as one group; every receiver posts that phase as one group too, and waits
#   for it before computing further. Phase q's sender reaches it after its earlier phases,
#   which complete by induction on q: no cycle.
# * A parallel round computes first, on the values held from the round before, then posts
#   one group: ``publish``.
# * ``publish`` (every round): the values the next round reads from this one, from the
#   device that holds each (the publisher of its stage in a parallel round, its stage's
#   device in a sequential one) to every device that runs a consumer stage next round and
#   does not hold it already (the stride copies, idle in a sequential round, and every
#   reader after a parallel round); and each ε of the round, from the device that computed
#   it to every other device of the pipeline. Values of one dtype between one pair travel
#   packed in one buffer, in the plan's value order; ε after them.
# * ``hoist``: values computed once per run by their home stage (``partition/stages.py``)
#   go to every device of a stage that reads them, as one group before the first round, and
#   again whenever the conditioning changes (the same decision on every rank: every rank
#   tracks the same inputs, ``asyncdiff/hoisted.py``).
# * ``guidance`` (CFG-parallel, ``asyncdiff/guidance.py``): after ``publish`` every device
#   holds its group's ε of each step of the round; it swaps each with the device at the same
#   place in the other group, one group per round.
# Replicas share nothing: each pipeline's program is its own, its ranks offset.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from asyncdiff.lowering.actions import Comm, Compute, Group, Item, Payload
from typing import TYPE_CHECKING

from asyncdiff.timeline import Round, Timeline

if TYPE_CHECKING:  # a type only: the lowering is pure data, it imports no torch
    from partition.plan import Plan


@dataclass(frozen=True)
class RankProgram:
    """Everything rank ``rank`` does: ``hoist`` (or None) before round 0 and whenever the
    conditioning changes, then ``rounds[r]``: its items of round r, in order."""

    rank: int
    pipeline: int  # replica · groups + group
    device: int    # its place in its pipeline (the timeline's device)
    hoist: Group | None
    rounds: tuple[tuple[Item, ...], ...]

    def groups(self) -> Iterator[Group]:
        """Every group in posting order (the hoist once, at the start)."""
        if self.hoist is not None:
            yield self.hoist
        for items in self.rounds:
            yield from (i for i in items if isinstance(i, Group))

    def bytes_sent(self, round_index: int | None = None) -> int:
        """Bytes this rank sends in round ``round_index``, or in the whole run (hoist once)."""
        if round_index is not None:
            return sum(i.bytes_sent for i in self.rounds[round_index] if isinstance(i, Group))
        return sum(g.bytes_sent for g in self.groups())


@dataclass(frozen=True)
class Lowered:
    """Every rank's program; ``rank = (replica · groups + group) · devices + device``."""

    timeline: Timeline
    devices: int   # per pipeline
    groups: int    # 2 with CFG-parallel (uncond, cond), else 1
    replicas: int
    programs: tuple[RankProgram, ...]

    @property
    def world(self) -> int:
        return len(self.programs)

    def program(self, rank: int) -> RankProgram:
        return self.programs[rank]

    def __str__(self) -> str:
        from asyncdiff.lowering.format import format_lowered
        return format_lowered(self)


def place(rank: int, devices: int, groups: int = 1) -> tuple[int, int, int]:
    """(replica, guidance group, device) of global rank ``rank``: the world's one layout,
    ``rank = (replica · groups + group) · devices + device``."""
    pipeline, device = divmod(rank, devices)
    replica, group = divmod(pipeline, groups)
    return replica, group, device


def lower(timeline: Timeline, plan: Plan, *, groups: int = 1, replicas: int = 1) -> Lowered:
    """Lower ``timeline`` on ``plan`` for ``replicas`` × ``groups`` pipelines
    ([Note: lowering])."""
    if plan.n != timeline.n:
        raise ValueError(f"plan has n={plan.n}, timeline n={timeline.n}: they must agree")
    if groups not in (1, 2):
        raise ValueError(f"groups={groups}; allowed: 1, 2 (CFG-parallel)")
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas={replicas!r}; allowed: an integer >= 1")
    devices = timeline.devices
    hoist, rounds = _pipeline(timeline, plan)
    eps = _eps(plan)
    programs = []
    for rank in range(replicas * groups * devices):
        _, group, d = place(rank, devices, groups)
        pipeline, base = rank // devices, rank - d
        own = [list(_offset(items, base)) for items in rounds[d]]
        if groups == 2:  # the rank at the same place in the other group
            peer = rank + devices * (1 - 2 * group)
            for rnd, items in zip(timeline.rounds, own):
                items.append(_guidance(rnd, peer, eps))
        programs.append(RankProgram(rank, pipeline, d, _offset_group(hoist.get(d), base),
                                    tuple(tuple(items) for items in own)))
    return Lowered(timeline, devices, groups, replicas, tuple(programs))


# --------------------------------------------------------------------------- one pipeline
Pairs = dict[tuple[int, int], list[Payload]]


def _pipeline(tl: Timeline, plan: Plan) -> tuple[dict[int, Group], list[list[list[Item]]]]:
    """Device-local programs of one pipeline: (hoist group per device, items[device][round])."""
    devices = tl.devices
    items: list[list[list[Item]]] = [[[] for _ in tl.rounds] for _ in range(devices)]
    segments = sorted((sg.start, sg.stop, st.index) for st in plan.stages
                      for sg in st.segments)
    own = {s: tuple(start for start, _, st in segments if st == s) for s in range(plan.n)}
    readers: dict[int, list] = defaultdict(list)  # round -> later actions reading its values
    for rnd in tl.rounds:
        for a in rnd.actions:
            if a.inputs_round is not None and a.inputs_round != rnd.index:
                readers[a.inputs_round].append(a)
    for rnd in tl.rounds:
        r = rnd.index
        if rnd.sequential:
            runner = {a.stage: a.device for a in rnd.actions}
            for q, (start, stop, s) in enumerate(segments):
                items[runner[s]][r].append(Compute(r, (start,), f"compute {q}"))
                pairs: Pairs = defaultdict(list)
                for c, vals in _produced(plan, s, start, stop).items():
                    if runner[c] != runner[s]:  # one device (a step cache): nothing travels
                        pairs[(runner[s], runner[c])] += _packed("values", vals)
                for d, group in _groups(r, f"fresh {q}", pairs).items():
                    items[d][r].append(group)
        else:
            for a in rnd.actions:
                items[a.device][r].append(Compute(r, own[a.stage]))
        for d, group in _groups(r, "publish", _publish(tl, plan, rnd, readers)).items():
            items[d][r].append(group)
    return _hoist(tl, plan), items


def _produced(plan: Plan, stage: int, start: int, stop: int) -> dict[int, list]:
    """Consumer stage -> the values segment [start, stop) of ``stage`` produces for it."""
    out: dict[int, list] = defaultdict(list)
    for v in plan.values:
        if v.producer == stage and start <= v.position < stop:
            for c in v.consumers:
                out[c].append(v)
    return out


def _publish(tl: Timeline, plan: Plan, rnd: Round, readers: dict[int, list]) -> Pairs:
    """The end of round ``rnd``: what later rounds read from it, and its ε."""
    pairs: Pairs = defaultdict(list)
    for b in readers[rnd.index]:
        need: dict[int, list] = defaultdict(list)
        for v in plan.values:
            if b.stage in v.consumers and not _holds(rnd, b.device, v):
                src = rnd.publisher(v.producer).device
                if src == b.device:
                    raise AssertionError(f"round {rnd.index}: device {src} would send "
                                         f"{v.name} to itself")
                need[src].append(v)
        for src, vals in sorted(need.items()):
            pairs[(src, b.device)] += _packed("values", vals)
    eps = _eps(plan)
    for a in sorted({rnd.eps_source(k) for k in rnd.steps}, key=lambda a: a.device):
        for dst in range(tl.devices):
            if dst != a.device:
                pairs[(a.device, dst)].append(Payload("eps", eps.dtype, eps.numel,
                                                      steps=a.eps_steps))
    return pairs


def _holds(rnd: Round, device: int, v) -> bool:
    """Whether ``device`` ends round ``rnd`` holding value ``v`` of that round: it ran a
    consumer stage of ``v`` in a sequential round (and received it fresh)."""
    return rnd.sequential and any(a.device == device and a.stage in v.consumers
                                  for a in rnd.actions)


def stage_devices(tl: Timeline) -> dict[int, tuple[int, ...]]:
    """Stage -> the devices that run it anywhere in ``tl``, lowest first (its home copy)."""
    out: dict[int, set[int]] = defaultdict(set)
    for rnd in tl.rounds:
        for a in rnd.actions:
            out[a.stage].add(a.device)
    return {s: tuple(sorted(ds)) for s, ds in out.items()}


def _hoist(tl: Timeline, plan: Plan) -> dict[int, Group]:
    """The values a home stage computes once per run, on its first device, and sends to every
    other device that reads them (``partition/stages.py``); device-local groups."""
    pairs: Pairs = defaultdict(list)
    by_dst: dict[tuple[int, int], list] = defaultdict(list)
    runs = stage_devices(tl)
    for h in plan.hoisted:
        if h.home < 0:
            continue
        home = runs[h.home][0]
        readers = sorted({d for c in h.consumers for d in runs.get(c, ())} - {home})
        for d in readers:
            by_dst[(home, d)].append(h)
    for pair, hs in sorted(by_dst.items()):
        pairs[pair] += _packed("hoisted", hs)
    return _groups(0, "hoist", pairs)


def _packed(kind: str, vals: list) -> list[Payload]:
    """One payload per dtype, the values in the order given (the plan's)."""
    by: dict[str, list] = defaultdict(list)
    for v in vals:
        by[v.dtype].append(v)
    return [Payload(kind, dtype, sum(math.prod(v.shape) for v in vs),  # type: ignore[arg-type]
                    names=tuple(v.name for v in vs)) for dtype, vs in sorted(by.items())]


def _groups(r: int, phase: str, pairs: Pairs) -> dict[int, Group]:
    """One group per device that takes part: its sends and receives of ``pairs``, pair by
    pair in sorted order (both ends of a pair see its messages in the same order)."""
    ops: dict[int, list[Comm]] = defaultdict(list)
    for (src, dst), payloads in sorted(pairs.items()):
        for p in payloads:
            ops[src].append(Comm("send", dst, p))
            ops[dst].append(Comm("recv", src, p))
    return {d: Group(r, phase, tuple(comms)) for d, comms in sorted(ops.items())}


def _eps(plan: Plan) -> Payload:
    return Payload("eps", plan.output_dtype, math.prod(plan.output_shape) if
                   plan.output_shape else 1)


def _guidance(rnd: Round, peer: int, eps: Payload) -> Group:
    """CFG-parallel: swap each ε half of the round with ``peer``."""
    ops = []
    for a in sorted({rnd.eps_source(k) for k in rnd.steps}, key=lambda a: a.device):
        half = Payload("half", eps.dtype, eps.numel, steps=a.eps_steps)
        ops += [Comm("send", peer, half), Comm("recv", peer, half)]
    return Group(rnd.index, "guidance", tuple(ops))


def _offset_group(g: Group | None, base: int) -> Group | None:
    if g is None or not base:
        return g
    return Group(g.round, g.phase, tuple(Comm(c.op, c.peer + base, c.payload) for c in g.ops))


def _offset(items: list[Item], base: int) -> Iterator[Item]:
    for i in items:
        yield _offset_group(i, base) if isinstance(i, Group) else i
