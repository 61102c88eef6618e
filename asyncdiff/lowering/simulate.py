"""Replay lowered programs under NCCL's rules, without devices: does every rank finish?

The rules (docs/design.md, "Communication"; [Note: lowering]):

* no tags: the k-th send from A to B is matched with the k-th receive B posts from A, and the
  two must agree on element count and dtype (NCCL would otherwise read garbage or fail);
* one stream per rank: its groups run in posting order, a group only after the one before
  it has completed;
* a group is fused (``batch_isend_irecv``): its operations are posted together and progress
  independently;
* an operation completes only when its peer has posted the matching one (a receive holds the
  stream until the send runs; a send is assumed to wait for its receive, as large ones do).

The executor refuses to start a schedule this rejects (:func:`check`), naming the round, the
phase and the pair; the tests replay every lowered configuration (N, S, W, cool-down, sync,
CFG-parallel, the hybrid, replicas, hoisted values). torch.distributed.pipelining checks
its lowered actions with a comms simulator of the same kind.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from asyncdiff.lowering.actions import Group


class ScheduleError(RuntimeError):
    """A lowered schedule that would hang or mismatch under NCCL's rules."""


@dataclass(frozen=True)
class Replay:
    """What a replay saw: groups completed per rank, and operations matched."""

    groups: dict[int, int]
    matched: int


def replay(streams: Mapping[int, Sequence[Group]]) -> Replay:
    """Run every rank's groups (in posting order) under NCCL's rules; raise
    :class:`ScheduleError` on a size mismatch, an unmatched operation or a deadlock."""
    # where each operation sits, and its partner by per-direction FIFO order
    posted: dict[tuple[int, int, str], list[tuple[int, int, int]]] = {}
    for rank, groups in streams.items():
        for gi, g in enumerate(groups):
            for oi, c in enumerate(g.ops):
                if c.peer == rank or c.peer not in streams:
                    raise ScheduleError(f"round {g.round} {g.phase}: rank {rank} posts a "
                                        f"{c.op} with rank {c.peer}, which is not a peer")
                src, dst = (rank, c.peer) if c.op == "send" else (c.peer, rank)
                posted.setdefault((src, dst, c.op), []).append((rank, gi, oi))
    partner: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    matched = 0
    for (src, dst, op), ops in posted.items():
        if op != "send":
            continue
        recvs = posted.get((src, dst, "recv"), [])
        for k, (s_at, r_at) in enumerate(zip(ops, recvs)):
            sp, rp = _op(streams, s_at).payload, _op(streams, r_at).payload
            if (sp.numel, sp.dtype) != (rp.numel, rp.dtype):
                raise ScheduleError(
                    f"{_where(streams, s_at)}: rank {src} sends {sp.numel} {sp.dtype} "
                    f"({sp.describe()}) as message {k} to rank {dst}, which receives "
                    f"{rp.numel} {rp.dtype} ({rp.describe()}) at {_where(streams, r_at)}")
            partner[s_at], partner[r_at] = r_at, s_at
            matched += 1
    for (src, dst, op), ops in posted.items():
        other = posted.get((src, dst, "recv" if op == "send" else "send"), [])
        if len(ops) > len(other):
            at = ops[len(other)]
            raise ScheduleError(f"{_where(streams, at)}: rank {at[0]}'s {op} "
                                f"{'to' if op == 'send' else 'from'} rank "
                                f"{dst if op == 'send' else src} has no matching "
                                f"{'receive' if op == 'send' else 'send'}")
    pos = {rank: 0 for rank in streams}
    progress = True
    while progress:
        progress = False
        for rank, groups in streams.items():
            while pos[rank] < len(groups) and all(
                    pos[partner[(rank, pos[rank], oi)][0]] >= partner[(rank, pos[rank], oi)][1]
                    for oi in range(len(groups[pos[rank]].ops))):
                pos[rank] += 1
                progress = True
    stuck = {r: p for r, p in pos.items() if p < len(streams[r])}
    if stuck:
        lines = []
        for rank, gi in sorted(stuck.items()):
            g = streams[rank][gi]
            for oi, c in enumerate(g.ops):
                peer_rank, peer_gi, _ = partner[(rank, gi, oi)]
                if pos[peer_rank] < peer_gi:
                    pg = streams[peer_rank][peer_gi]
                    lines.append(f"rank {rank} waits in round {g.round} {g.phase} on its {c.op} "
                                 f"{'to' if c.op == 'send' else 'from'} rank {peer_rank}, "
                                 f"which posts it only in round {pg.round} {pg.phase}")
                    break
        raise ScheduleError("deadlock under NCCL's rules: " + "; ".join(lines))
    return Replay(dict(pos), matched)


def check(lowered, hoist_every_round: bool = False) -> Replay:
    """Replay every rank of ``lowered`` (:class:`asyncdiff.lowering.Lowered`). The hoist group
    is replayed before round 0, or, with ``hoist_every_round``, before every round (the
    conditioning changing at every call: the worst case of a mid-run re-hoist)."""
    streams = {}
    for p in lowered.programs:
        groups: list[Group] = []
        for r, items in enumerate(p.rounds):
            if p.hoist is not None and (r == 0 or hoist_every_round):
                groups.append(p.hoist)
            groups += [i for i in items if isinstance(i, Group)]
        streams[p.rank] = groups
    return replay(streams)


def _op(streams, at):
    rank, gi, oi = at
    return streams[rank][gi].ops[oi]


def _where(streams, at) -> str:
    g = streams[at[0]][at[1]]
    return f"round {g.round} {g.phase}"


def checked_program(timeline, plan, rank: int, *, groups: int = 1, replicas: int = 1):
    """Rank ``rank``'s program of ``timeline`` on ``plan``, after the whole world's program has
    been replayed under NCCL's rules: a schedule that would hang or mismatch raises
    :class:`ScheduleError` (naming the round, the phase and the pair) before anything is
    posted. Every executor gets its program here."""
    from asyncdiff.lowering.programs import lower

    lowered = lower(timeline, plan, groups=groups, replicas=replicas)
    check(lowered)
    return lowered.program(rank)
