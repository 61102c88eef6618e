"""How a group of lowered operations is posted and waited: the only place the runtime calls
point-to-point ``torch.distributed``.

Every group goes out as one ``batch_isend_irecv`` ([Note: lowering]): NCCL fuses it, so a
group's sends and receives progress together and no rank's stream can hold on a receive
its peer answers only later. No tags: both ends derive the same order. A failed wait names
the round, the phase and the peer.

:class:`LocalTransport` runs the same groups between threads of one process (each thread
one rank, each tensor handed over by reference): each rank's loop on one GPU, and a check of
the NCCL matching rules as they run (``make gpu-check``, ``tests/asyncdiff/test_local_ranks.py``).
"""
from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from asyncdiff.distributed import liveness
from asyncdiff.distributed.watch import Watch
from asyncdiff.lowering import Group


# the functions themselves, taken once: P2POp accepts only these (and a recorder,
# asyncdiff/distributed/trace.py, may stand in for the module's names while it records)
_ISEND, _IRECV = dist.isend, dist.irecv


class PeerError(RuntimeError):
    """A message to or from another rank failed or timed out: that rank died or hangs."""


class Posted(Protocol):
    def wait(self) -> None: ...


class Transport(Protocol):
    """Posts one group: ``tensors[i]`` is the buffer of ``group.ops[i]`` (sent, or received
    into); returns what to wait on."""

    rank: int

    def post(self, group: Group, tensors: Sequence[torch.Tensor]) -> Posted: ...


class TorchTransport:
    """``torch.distributed`` (gloo on CPU, nccl on CUDA), in ``group`` (default: the world).
    ``step_s``: the step limit; on CUDA a :class:`~asyncdiff.distributed.watch.Watch` holds
    each group to it (NCCL's waits do not block the host)."""

    def __init__(self, rank: int, process_group=None, step_s: float | None = None):
        self.rank, self.pg, self.step_s = rank, process_group, step_s
        self._watch = None

    def post(self, group: Group, tensors: Sequence[torch.Tensor]) -> Posted:
        ops = [dist.P2POp(_ISEND if c.op == "send" else _IRECV, t, c.peer, self.pg)
               for c, t in zip(group.ops, tensors)]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as err:
            raise PeerError(f"rank {self.rank}: round {group.round} {group.phase}: posting to "
                            f"{_who(_peers(group))} failed: {_first_line(err)}") from err
        if tensors and tensors[0].is_cuda:
            return self._watched(group, works, list(tensors))
        return _TorchPosted(self.rank, group, works, list(tensors))

    def _watched(self, group: Group, works, tensors) -> Posted:
        """NCCL: the compute stream waits for the group, the host goes on; an event after it
        tells the watch when it is done."""
        for work in works:
            work.wait()  # the current stream waits; the host does not
        done = torch.cuda.Event()
        done.record()
        if self._watch is None and self.step_s is not None:
            self._watch = Watch(self.rank, self.step_s)
        if self._watch is not None:
            self._watch.add(done.query, group)
        return _Done(tensors)


class _Done:
    def __init__(self, tensors):
        self._keep = tensors  # the buffers live as long as the caller holds this

    def wait(self) -> None:
        pass


class _TorchPosted:
    def __init__(self, rank: int, group: Group, works, tensors):
        self.rank, self.group, self.works = rank, group, works
        self._keep = tensors  # the buffers live until the operations complete

    def wait(self) -> None:
        g = self.group
        for i, work in enumerate(self.works):
            try:
                work.wait()
            except RuntimeError as err:
                peers = [g.ops[i].peer] if len(self.works) == len(g.ops) else _peers(g)
                # a silent one (stopped, dead) is ended if it runs here; a live one may be
                # waiting on another rank, and is left to report that one
                down = [p for p in peers
                        if liveness.put_down(p, f"no answer in round {g.round} {g.phase}")]
                state = "silent: stopped or dead" if down else "did it die, or is it " \
                    "waiting on another rank?"
                raise PeerError(
                    f"rank {self.rank}: round {g.round} {g.phase}: no answer from "
                    f"{_who(peers)} ({state}): {_first_line(err)}") from err
        self._keep = []


class LocalTransport:
    """One rank of a world of threads in this process. Messages match as NCCL matches them:
    per (sender, receiver) in posting order, no tags, the same element count and dtype, or
    :class:`PeerError`; a receive waits at most ``timeout_s``."""

    class World:
        def __init__(self, size: int, timeout_s: float = 60.0):
            self.size, self.timeout_s = size, timeout_s
            self.cond = threading.Condition()
            # (sender, receiver) -> sent and not yet received: (tensor, set when received)
            self.queues: dict[tuple[int, int], list[tuple[torch.Tensor, threading.Event]]] = \
                defaultdict(list)
            self.failed: str | None = None

    def __init__(self, world: "LocalTransport.World", rank: int):
        self.world, self.rank = world, rank

    def post(self, group: Group, tensors: Sequence[torch.Tensor]) -> Posted:
        w = self.world
        sent = []
        with w.cond:
            for c, t in zip(group.ops, tensors):
                if c.op == "send":  # a send completes when its receive has copied it
                    sent.append((c.peer, threading.Event()))
                    w.queues[(self.rank, c.peer)].append((t, sent[-1][1]))
            w.cond.notify_all()
        return _LocalPosted(self, group, tensors, sent)

    def fail(self, why: str) -> None:
        """End every rank's waits; the first failure is the one reported."""
        with self.world.cond:
            self.world.failed = self.world.failed or why
            self.world.cond.notify_all()


class _LocalPosted:
    def __init__(self, transport: LocalTransport, group: Group, tensors, sent):
        self.t, self.group, self.tensors, self.sent = transport, group, list(tensors), sent

    def wait(self) -> None:
        w, me, g = self.t.world, self.t.rank, self.group
        for c, buf in zip(g.ops, self.tensors):
            if c.op != "recv":
                continue
            with w.cond:
                ok = w.cond.wait_for(lambda: w.queues[(c.peer, me)] or w.failed,
                                     timeout=w.timeout_s)
                if w.failed:
                    raise PeerError(f"rank {me}: round {g.round} {g.phase}: {w.failed}")
                if not ok:
                    raise PeerError(f"rank {me}: round {g.round} {g.phase}: no answer from "
                                    f"rank {c.peer} within {w.timeout_s:.0f} s")
                sent, done = w.queues[(c.peer, me)].pop(0)
            if sent.numel() != buf.numel() or sent.dtype != buf.dtype:
                self.t.fail(f"rank {c.peer} sent {sent.numel()} {sent.dtype} to rank {me}, "
                            f"which receives {buf.numel()} {buf.dtype} (NCCL would mismatch)")
                raise PeerError(f"rank {me}: round {g.round} {g.phase}: {w.failed}")
            buf.copy_(sent.reshape(buf.shape))
            with w.cond:
                done.set()
                w.cond.notify_all()
        for peer, done in self.sent:
            with w.cond:
                ok = w.cond.wait_for(lambda: done.is_set() or w.failed, timeout=w.timeout_s)
            if w.failed:
                raise PeerError(f"rank {me}: round {g.round} {g.phase}: {w.failed}")
            if not ok:
                raise PeerError(f"rank {me}: round {g.round} {g.phase}: rank {peer} did not "
                                f"receive within {w.timeout_s:.0f} s")


def _peers(group: Group) -> list[int]:
    return sorted({c.peer for c in group.ops})


def _who(peers: list[int]) -> str:
    return f"rank {peers[0]}" if len(peers) == 1 else \
        f"ranks {', '.join(map(str, peers))}"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
