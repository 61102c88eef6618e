"""A lowered schedule for people: a round × phase grid with a column per rank.

A cell reads ``E2`` (the rank computes stage E²: all its segments in a parallel round, one
segment in a sequential round's phase), ``→1,3 v×2 1.5KiB`` (one message to each of ranks 1
and 3: two values packed), ``←2 ε4 4.0KiB`` (the ε of step 4 from rank 2), ``ε½`` (a
CFG-parallel ε half) or ``h×1`` (a hoisted value); ``·``: nothing.
"""
from __future__ import annotations

from collections import defaultdict

from asyncdiff.lowering.actions import Compute, _size


def _cell(item, stage_of) -> str:
    if isinstance(item, Compute):
        return f"E{stage_of + 1}"
    by: dict[tuple[str, str], list[int]] = defaultdict(list)
    for c in item.ops:
        by[(c.op, c.payload.describe())].append(c.peer)
    return "; ".join(f"{'→' if op == 'send' else '←'}{','.join(map(str, peers))} {what}"
                     for (op, what), peers in by.items())


def format_lowered(lowered, ranks: list[int] | None = None) -> str:
    """The grid of ``ranks`` (default: every rank of the first pipeline, and with CFG-parallel
    the first rank of the other group too)."""
    from asyncdiff.timeline import stage_of_device

    tl = lowered.timeline
    if ranks is None:
        ranks = list(range(lowered.devices))
        if lowered.groups == 2:
            ranks.append(lowered.devices)
    progs = [lowered.program(r) for r in ranks]
    head = ["round", "phase"] + [f"rank{r}" for r in ranks]
    rows = [head]
    if any(p.hoist is not None for p in progs):
        rows.append(["run start", "hoist"] + [_cell(p.hoist, 0) if p.hoist else "·"
                                              for p in progs])
    for rnd in tl.rounds:
        kind = {"warmup": "warm", "parallel": "par", "cooldown": "cool", "sync": "sync",
                "cached": "cache"}[rnd.kind]
        # phases in order; a sequential round's segment q computes, then ``fresh q``
        order: list[str] = []
        cells: dict[str, dict[int, str]] = defaultdict(dict)
        for i, p in enumerate(progs):
            for item in p.rounds[rnd.index]:
                key = item.phase
                if key not in order:
                    order.append(key)
                cells[key][i] = _cell(item, stage_of_device(p.device, tl.n))
        order.sort(key=_phase_key)
        label = f"r{rnd.index} {kind} " + ",".join(map(str, rnd.steps))
        for key in order:
            rows.append([label, key] + [cells[key].get(i, "·") for i in range(len(progs))])
            label = ""
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    sent = ", ".join(f"rank{p.rank} {_size(p.bytes_sent())}" for p in progs)
    title = (f"communication N={tl.n} S={tl.stride} W={tl.warmup} T={tl.steps} "
             f"stride_noise={tl.stride_noise}"
             + (f" cooldown={tl.cooldown}" if tl.cooldown else "")
             + (f" sync={list(tl.sync)}" if tl.sync and not tl.cache else "")
             + f": {lowered.world} ranks ({lowered.replicas} replica(s) × {lowered.groups} "
             f"guidance group(s) × {lowered.devices} devices); each phase is one "
             "batch_isend_irecv group per rank")
    return "\n".join([title] + lines + [f"sent per run: {sent}"])


def _phase_key(key: str) -> tuple:
    kind, _, q = key.partition(" ")
    rank = {"compute": 0, "fresh": 1, "publish": 3, "guidance": 4}.get(kind, 2)
    if kind in ("compute", "fresh") and q:
        return (1, int(q), rank)
    return (rank if kind != "compute" else 0, -1, 0)
