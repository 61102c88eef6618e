"""Before the first step: waits that name a rank that stopped, instead of hanging on it.

Start-up takes as long as it takes (rank 0 planning a full-size model can take minutes while
the others wait for its plan), so a fixed collective timeout would either kill a slow but
healthy start or wait far too long for a dead one. Instead every rank keeps a heartbeat in
the rendezvous store (a thread: it stops when the process is stopped, killed or wedged
outside Python's reach), and before each start-up collective every rank *arrives* at a
named point and waits for the others there, for as long as each missing rank's heartbeat
moves. A missing rank whose heartbeat has not moved for ``limit_s`` (the start-up limit,
``parallel.startup_timeout_s``) ends the wait with an error naming it and the point it did
not reach. The collective that follows then runs with every rank present.

From the first step on, every wait is a point-to-point wait of the lowered program, bounded
by the loop group's timeout (``parallel.step_timeout_s``), and the rank that did not answer
is named by the one waiting on it (``asyncdiff/distributed/transport.py``).

A rank found silent is *put down* (:func:`put_down`) by the one that found it, when both run on
the same host: SIGKILL to the process id it registered. A stopped process keeps a SIGTERM
pending until it is continued, so a launcher's SIGTERM would leave it behind (torchrun waits
30 s more, then kills it); the run has failed either way, and this ends it within the limit.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
import time
from collections import Counter

import torch.distributed as dist

PREFIX = "asyncdiff/live"


class StartupError(RuntimeError):
    """A rank stopped answering before the first step."""


class Liveness:
    """This rank's heartbeat in ``store`` and its start-up meeting points."""

    def __init__(self, store, rank: int, world: int, limit_s: float, period_s: float = 0.5):
        self.store, self.rank, self.world = store, rank, world
        self.limit_s, self.period_s = float(limit_s), period_s
        self._points: Counter[str] = Counter()
        self._stop = threading.Event()
        store.set(f"{PREFIX}/pid/{rank}", f"{socket.gethostname()} {os.getpid()}")
        self._beat()
        self._thread = threading.Thread(target=self._beating, daemon=True,
                                         name=f"asyncdiff-heartbeat-{rank}")
        self._thread.start()

    def _beat(self) -> None:
        self.store.add(f"{PREFIX}/beat/{self.rank}", 1)

    def _beating(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store is gone: the run is over
                return

    def arrive(self, point: str) -> None:
        """Wait until every rank has arrived at ``point`` (the n-th arrival at a point of
        that name meets the others' n-th); raise :class:`StartupError` naming a rank whose
        heartbeat stopped for ``limit_s`` before it arrived."""
        self._points[point] += 1
        key = f"{PREFIX}/at/{point}/{self._points[point]}"
        self.store.set(f"{key}/{self.rank}", "1")
        seen: dict[int, tuple[int, float]] = {}
        while True:
            missing = [r for r in range(self.world) if not self.store.check([f"{key}/{r}"])]
            if not missing:
                return
            now = time.monotonic()
            for r in missing:
                beat = self.store.add(f"{PREFIX}/beat/{r}", 0)
                if r not in seen or seen[r][0] != beat:
                    seen[r] = (beat, now)
                elif now - seen[r][1] > self.limit_s:
                    self.put_down(r)
                    raise StartupError(
                        f"rank {r} stopped answering before {point}: no heartbeat for "
                        f"{self.limit_s:.0f} s (parallel.startup_timeout_s; stopped, hung or "
                        "dead)")
            time.sleep(min(0.2, self.period_s))

    def put_down(self, rank: int) -> bool:
        """SIGKILL ``rank`` if it runs on this host (module docstring); True if it was sent."""
        if rank == self.rank or not self.store.check([f"{PREFIX}/pid/{rank}"]):
            return False
        host, pid = self.store.get(f"{PREFIX}/pid/{rank}").decode().split()
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def close(self) -> None:
        self._stop.set()


_current: Liveness | None = None


def start(limit_s: float, store=None) -> Liveness:
    """Install this process's heartbeat (in ``store``, or the default group's store)."""
    global _current
    if _current is not None:
        _current.close()
    if store is None:
        store = dist.distributed_c10d._get_default_store()
    _current = Liveness(store, dist.get_rank(), dist.get_world_size(), limit_s)
    return _current


def arrive(point: str) -> None:
    """Meet every rank at ``point`` (:meth:`Liveness.arrive`); without a heartbeat installed
    (a user's own process group) nothing to wait for: the collective that follows is bounded
    by its group's timeout alone."""
    if _current is not None:
        _current.arrive(point)


def put_down(rank: int) -> None:
    """A peer found silent in the loop (:meth:`Liveness.put_down`)."""
    if _current is not None:
        try:
            _current.put_down(rank)
        except Exception:  # noqa: BLE001 - the store may be gone with the run; report anyway
            pass


def stop() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None


def loop_group(step_s: float):
    """A group over every rank whose waits are bounded by ``step_s``: the sampling loop's
    point-to-point messages go through it (every rank must call this, in the same order)."""
    arrive("the loop group")
    return dist.new_group(timeout=datetime.timedelta(seconds=step_s))
