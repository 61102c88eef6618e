"""Before the first step: agreement through the rendezvous store, and waits that name a rank
that stopped or hangs instead of waiting on it.

Start-up (building and capturing the model, rank 0 planning, every rank rebuilding its
stage, the plan check) exchanges only small objects, so it goes through the rendezvous store
(any backend: no device, no collective of NCCL's before the loop), at named *meeting points*:
every rank arrives, and waits for the others at most ``limit_s`` (the start-up limit,
``parallel.startup_timeout_s``) from its own arrival. A rank missing then is named, with
what its heartbeat says: every rank keeps one in the store, beaten by a thread of its own on
a connection of its own, which stops when the process is stopped or dies, and goes on when
it hangs ("alive, but not at <point> within 120 s"). Planning a model bigger than the limit
allows needs a bigger ``parallel.startup_timeout_s``; the message says so.

From the first step on every wait is a point-to-point wait of the lowered program, bounded
by the step limit (``parallel.step_timeout_s``) of the loop's own group, and the rank waiting
names the one that did not answer (``transport.py``).

A rank found *silent* (its heartbeat still for the liveness window) is put down by the one
that found it, when both run on one host and the process is verifiably the one that
registered (host, boot, PID namespace, PID, start time): SIGKILL. A stopped process keeps
SIGTERM pending until it is continued, so a launcher's SIGTERM would leave it behind
(torchrun waits 30 s more, then kills it). A live rank is never put down: it may be waiting
on the silent one. The reason is recorded, for the launcher to report.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter

import torch.distributed as dist

BEAT_S = 0.5    # heartbeat period
SILENT_S = 3.0  # a heartbeat still this long: the process is stopped or dead


class StartupError(RuntimeError):
    """A rank did not reach a start-up meeting point in time."""


def _namespace() -> str:
    """Keys of this run: a torchrun restart rendezvouses again on the same store."""
    return "asyncdiff/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", "run"),
                                    os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def identity(pid: int | None = None) -> dict:
    """What makes a process this process: host, boot, PID namespace, PID, start time."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"),
            "pidns": _pidns(pid), "pid": pid, "start": _start_time(pid)}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pidns(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


def _start_time(pid: int) -> str:
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


class Liveness:
    """This rank's heartbeat, meeting points and exchanges, in ``store``."""

    def __init__(self, store, rank: int, world: int, limit_s: float):
        self.store, self.rank, self.world = store, rank, world
        self.limit_s = float(limit_s)
        self.ns = _namespace()
        self._points: Counter[str] = Counter()
        self._stop = threading.Event()
        self.store.set(self._key("who", rank), json.dumps(identity()))
        beats = store.clone()  # a thread of its own needs a connection of its own
        beats.add(self._key("beat", rank), 1)
        self._thread = threading.Thread(target=self._beating, args=(beats,), daemon=True,
                                         name=f"asyncdiff-heartbeat-{rank}")
        self._thread.start()

    def _key(self, *parts) -> str:
        return "/".join([self.ns, *map(str, parts)])

    def _beating(self, beats) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                beats.add(self._key("beat", self.rank), 1)
            except Exception:  # noqa: BLE001 - a passing store error: beat again next time
                continue

    def beat_of(self, rank: int) -> int:
        return self.store.add(self._key("beat", rank), 0)

    def silent(self, rank: int, window_s: float = SILENT_S) -> bool:
        """Whether ``rank``'s heartbeat stays still for ``window_s`` (stopped or dead)."""
        first, t0 = self.beat_of(rank), time.monotonic()
        while time.monotonic() - t0 < window_s:
            time.sleep(BEAT_S / 2)
            if self.beat_of(rank) != first:
                return False
        return True

    # ------------------------------------------------------------------ meetings
    def arrive(self, point: str) -> None:
        """Wait until every rank has arrived at ``point`` (the n-th arrival at a point of
        that name meets the others' n-th); at most ``limit_s`` from this rank's arrival."""
        self._points[point] += 1
        key = self._key("at", point, self._points[point])
        self.store.set(f"{key}/{self.rank}", "1")
        t0 = time.monotonic()
        seen: dict[int, tuple[int, float]] = {}
        while True:
            missing = [r for r in range(self.world) if not self.store.check([f"{key}/{r}"])]
            if not missing:
                return
            now = time.monotonic()
            for r in missing:
                beat = self.beat_of(r)
                if r not in seen or seen[r][0] != beat:
                    seen[r] = (beat, now)
            if now - t0 > self.limit_s:
                r = missing[0]
                still = now - seen[r][1]
                if still > SILENT_S:
                    self.put_down(r, f"no heartbeat for {still:.0f} s before {point}")
                    state = f"no heartbeat for {still:.0f} s: stopped or dead"
                else:
                    state = ("alive, but busy or hung: raise parallel.startup_timeout_s if it "
                             "is planning a large model")
                raise StartupError(
                    f"rank {r} did not reach {point} within {self.limit_s:.0f} s of this rank "
                    f"(parallel.startup_timeout_s): {state}"
                    + (f"; also missing: ranks {missing[1:]}" if missing[1:] else ""))
            time.sleep(0.1)

    def exchange(self, point: str, value: str) -> list[str]:
        """Every rank's ``value`` at ``point`` (an all-gather through the store)."""
        n = self._points[point] + 1
        self.store.set(self._key("val", point, n, self.rank), value)
        self.arrive(point)
        return [self.store.get(self._key("val", point, n, r)).decode()
                for r in range(self.world)]

    def silent_ranks(self, window_s: float = SILENT_S) -> list[int]:
        """The other ranks whose heartbeat stays still for ``window_s``, watched together."""
        others = [r for r in range(self.world) if r != self.rank]
        first = {r: self.beat_of(r) for r in others}
        time.sleep(window_s)
        return [r for r in others if self.beat_of(r) == first[r]]

    @contextlib.contextmanager
    def connecting(self, what: str):
        """Around a step where the ranks connect through the store (making a process group):
        if it fails (a peer stopped while the others connect, and the store's wait ran out),
        the silent ranks are named and put down instead of a store key."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - re-raised, or raised as a StartupError
            silent = self.silent_ranks()
            if not silent:
                raise
            for r in silent:
                self.put_down(r, f"no heartbeat while connecting ({what})")
            what_ranks = "rank" if len(silent) == 1 else "ranks"
            raise StartupError(
                f"{what_ranks} {', '.join(map(str, silent))} stopped answering while the ranks "
                f"made {what} (no heartbeat for {SILENT_S:.0f} s: stopped or dead): "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
            ) from err

    # ------------------------------------------------------------------ putting down
    def put_down(self, rank: int, why: str) -> bool:
        """End ``rank`` (SIGKILL) if it is silent and runs on this host as the process it
        registered (module docstring); record why. True if it will be. By default the signal
        goes as this process exits, after it has reported the error that named ``rank``: a
        launcher watching the ranks (torchrun) stops them all at the first death it sees, and
        that must not be the silent rank's, before the message naming it is out."""
        if rank == self.rank or not self.store.check([self._key("who", rank)]):
            return False
        who = json.loads(self.store.get(self._key("who", rank)).decode())
        if who["pid"] == os.getpid():
            return False
        here = identity(who["pid"])
        if any(who[k] != here[k] for k in ("host", "boot", "pidns", "start")) or \
                not who["start"] or not self.silent(rank):
            return False
        self.store.set(self._key("down", rank), f"put down by rank {self.rank}: {why}")
        _pending.append(who)
        return True

    def downed(self, rank: int) -> str | None:
        """Why ``rank`` was put down, if it was."""
        key = self._key("down", rank)
        return self.store.get(key).decode() if self.store.check([key]) else None

    def close(self) -> None:
        self._stop.set()


def records(store, world: int) -> dict[int, str]:
    """What the ranks recorded of each other in ``store``: who was put down, and why; what a
    rank reported as it ended itself (``report``). For a launcher that owns the store."""
    ns, out = _namespace(), {}
    for r in range(world):
        for kind in ("down", "failed"):
            key = f"{ns}/{kind}/{r}"
            if store.check([key]):
                out[r] = store.get(key).decode()
                break
    return out


def _kill(who: dict) -> None:
    """SIGKILL the process ``who`` registered, if it is still that process."""
    if identity(who["pid"]).get("start") != who["start"]:
        return
    try:
        os.kill(who["pid"], signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_pending: list[dict] = []


@atexit.register
def put_down_pending() -> None:
    """Send the signals :meth:`Liveness.put_down` deferred (at exit; a process ending with
    ``os._exit`` calls this itself)."""
    while _pending:
        _kill(_pending.pop())


_current: Liveness | None = None


def start(limit_s: float, store=None, rank: int | None = None,
          world: int | None = None) -> Liveness:
    """Install this process's heartbeat and meetings, in ``store`` (default: the default
    process group's store, rank and size). Started before the process group is made, so
    that making it names a rank that stopped meanwhile (:meth:`Liveness.connecting`)."""
    global _current
    if _current is not None:
        _current.close()
    if store is None:
        store = dist.distributed_c10d._get_default_store()
    _current = Liveness(store, dist.get_rank() if rank is None else rank,
                        dist.get_world_size() if world is None else world, limit_s)
    return _current


def connecting(what: str):
    return current().connecting(what)


def current() -> Liveness:
    """The installed liveness; in a process group made without it (a user's own script
    using the drop-in), one with the default start-up limit."""
    from asyncdiff.distributed.limits import STARTUP_S

    return _current if _current is not None else start(STARTUP_S)


def arrive(point: str) -> None:
    current().arrive(point)


def exchange(point: str, value: str) -> list[str]:
    return current().exchange(point, value)


def put_down(rank: int, why: str) -> bool:
    """A peer found silent in the loop (:meth:`Liveness.put_down`); never raises."""
    try:
        return _current is not None and _current.put_down(rank, why)
    except Exception:  # noqa: BLE001 - the store may be gone with the run
        return False


def stop() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None


_groups: dict[tuple, object] = {}


def loop_group(step_s: float, device=None):
    """A group over every rank whose waits are bounded by ``step_s``: the sampling loop's
    messages go through it. One per step limit and process group (every rank must call this
    in the same order). Under NCCL its first call is a barrier on ``device`` (a group's first
    operation may not be point-to-point), and its own timeout is left above ``step_s`` so the
    loop's watch (``transport.py``) names the silent peer first."""
    key = (id(dist.distributed_c10d._get_default_group()), float(step_s))
    if key not in _groups:
        arrive("the loop group")
        nccl = dist.get_backend() == "nccl"
        timeout = step_s + max(60.0, step_s) if nccl else step_s
        with connecting("the loop group"):
            group = dist.new_group(timeout=datetime.timedelta(seconds=timeout))
        if nccl:
            dist.barrier(group=group, device_ids=[device.index] if device is not None else None)
        _groups[key] = group
    return _groups[key]


def report(message: str) -> None:
    """A failure found outside the main thread: print it, and record it for the launcher."""
    print(message, file=sys.stderr, flush=True)
    if _current is not None:
        try:
            _current.store.set(_current._key("failed", _current.rank), message)
        except Exception:  # noqa: BLE001 - the message is printed either way
            pass
