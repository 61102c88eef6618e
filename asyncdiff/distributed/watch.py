"""NCCL: a group that never completes, found without synchronising the host.

Under NCCL, waiting on a posted group makes the compute stream wait, not the host, so a
silent peer never raises in the loop: NCCL's own watchdog would abort the ranks that wait,
naming nobody. So each posted group is followed by a CUDA event, and a thread of this rank
polls the events (``Event.query``: no synchronisation) in posting order. A group not done
``step_s`` after it was posted names its peers, silent ones first (their heartbeat is still:
``liveness.py``), puts the silent ones down, reports, and ends this process, before NCCL's
watchdog (the loop group's timeout is left above ``step_s``: ``liveness.loop_group``).
"""
from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable

from asyncdiff.distributed import liveness
from asyncdiff.lowering import Group


class Watch:
    """The posted groups of rank ``rank`` not known to be done, oldest first."""

    def __init__(self, rank: int, step_s: float, on_expire: Callable[[str], None] | None = None,
                 poll_s: float = 0.2):
        self.rank, self.step_s, self.poll_s = rank, float(step_s), poll_s
        self.on_expire = on_expire or _end_process
        self._posted: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                         name=f"asyncdiff-watch-{rank}")
        self._thread.start()

    def add(self, done: Callable[[], bool], group: Group) -> None:
        with self._lock:
            self._posted.append((done, group, time.monotonic() + self.step_s))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                while self._posted and self._posted[0][0]():
                    self._posted.popleft()
                late = self._posted[0] if self._posted and \
                    time.monotonic() > self._posted[0][2] else None
            if late is not None:
                self._expire(late[1])
                return

    def _expire(self, g: Group) -> None:
        peers = sorted({c.peer for c in g.ops})
        live = liveness._current
        silent = [p for p in peers if live is not None and live.silent(p)]
        for p in silent:  # the signal goes as this process ends (liveness.put_down)
            liveness.put_down(p, f"no answer in round {g.round} {g.phase} within "
                                 f"{self.step_s:.0f} s")
        who = silent or peers
        what = "rank" if len(who) == 1 else "ranks"
        self.on_expire(f"rank {self.rank}: round {g.round} {g.phase}: no answer from {what} "
                       f"{', '.join(map(str, who))} within {self.step_s:g} s "
                       f"(parallel.step_timeout_s){'' if silent else '; none of them silent'}")

    def close(self) -> None:
        self._stop.set()


def _end_process(message: str) -> None:
    liveness.report(message)
    liveness.put_down_pending()  # os._exit skips atexit
    os._exit(1)
