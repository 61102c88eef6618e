"""Measured time per module of the eager model, spread over the captured nodes it owns.

Why the eager model and not the captured graph node by node: the eager forward is the one the
verification needs anyway (``partition/verify.py``: stages == eager), so the time cost model
costs no forward of its own; and module times nest, so a module's *own* time (its inclusive
time less its children's) adds up exactly to the forward's time, where timing ~1,000 nodes
one by one adds every interpreter gap between them (on a GPU: 75 ms of node times against a
34 ms forward for SD 2.1). Cuts fall at module boundaries (``depth``), so what the balance
needs is exact: each module's own time. Inside a module the own time is spread evenly over the
nodes traced in it (a leaf module is one or two nodes); only cuts finer than modules
(``depth=None``) see that approximation.

On CUDA the times are CUDA events recorded around each module (kernel launches are
asynchronous: a host clock would time the launches). On the CPU at one intra-op thread the
clock is this thread's CPU time (:func:`host_clock`), not the wall clock.

[Note: the CPU clock] On a machine shared with other processes, the wall time of a piece of
work depends on when the scheduler runs something else on its core: timing full SD 1.5 block
by block with another process busy, each block read either its idle time or about twice that,
depending on the moment (a block of 1.44 s read 1.44 s in one pass and 2.98 s in the next), so
one timed pass skewed the balance by up to 30 % and two plans of one command differed. The
work a stage does is what a worker with a core of its own will take, and at one intra-op
thread all of it runs on the calling thread, so its CPU time is that measure: the same blocks
timed by ``time.thread_time`` with the other core busy read their idle times within 2 % (the
whole forward: 22.54 s busy, 22.41 s idle). With more threads the work is spread over a pool
the thread clock does not see, so the wall clock stays, and a busy machine skews it.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import fx, nn


def host_clock(threads: int) -> Callable[[], float]:
    """Seconds, for timing work on the host at ``threads`` intra-op threads: this thread's CPU
    time at one thread (time another process had the core is not counted: [Note: the CPU
    clock]), the wall clock with more."""
    return time.thread_time if threads == 1 else time.perf_counter


def clock_name(threads: int, cuda: bool = False) -> str:
    """What a plan records as the clock its times were read on."""
    return "cuda" if cuda else "thread cpu time" if threads == 1 else "wall"


class ModuleClock:
    """Forward hooks on every module of ``root``: inclusive time per module path per pass."""

    def __init__(self, root: nn.Module, cuda: bool = False):
        self.cuda = cuda
        self._clock = host_clock(torch.get_num_threads())
        self.passes: list[dict[str, float]] = []
        self._open: list[tuple[str, object]] = []
        self._now: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, object, object]] = []
        self._hooks = []
        for path, mod in root.named_modules():
            self._hooks.append(mod.register_forward_pre_hook(
                lambda m, a, path=path: self._start(path)))
            self._hooks.append(mod.register_forward_hook(
                lambda m, a, o, path=path: self._stop(path)))

    def _start(self, path: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open.append((path, ev))
        else:
            self._open.append((path, self._clock()))

    def _stop(self, path: str) -> None:
        if not self._open or self._open[-1][0] != path:
            return  # a module that raised inside a child; the pass is discarded anyway
        _, start = self._open.pop()
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((path, start, end))
        else:
            self._now[path] += (self._clock() - start) * 1e3

    def end_pass(self) -> None:
        if self._events:
            torch.cuda.synchronize()
            for path, s, e in self._events:
                self._now[path] += s.elapsed_time(e)
            self._events.clear()
        self.passes.append(dict(self._now))
        self._now = defaultdict(float)
        self._open.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()

    def median_inclusive(self) -> dict[str, float]:
        keys = {k for p in self.passes for k in p}
        return {k: statistics.median(p.get(k, 0.0) for p in self.passes) for k in keys}


def own_times(inclusive: dict[str, float]) -> dict[str, float]:
    """A module's own time: its inclusive time less that of the modules called directly
    inside it (never below 0). A container that is never called (``nn.ModuleList``,
    ``nn.ModuleDict``) has no time, so a module inside one counts as inside the nearest
    ancestor that was called; the own times then add up to the forward's time."""
    inner: dict[str, float] = defaultdict(float)
    for path, t in inclusive.items():
        outer = _parent(path)
        while outer is not None and outer not in inclusive:
            outer = _parent(outer)
        if outer is not None:
            inner[outer] += t
    return {path: max(t - inner[path], 0.0) for path, t in inclusive.items()}


def _parent(path: str) -> str | None:
    if path == "":
        return None
    return path.rsplit(".", 1)[0] if "." in path else ""


def spread_over_nodes(own: dict[str, float], gm: fx.GraphModule, module_of) -> dict[str, float]:
    """Per-node milliseconds: each module's own time spread evenly over the compute nodes
    traced inside it (innermost module, ``module_of(node)``); a module with time but no node
    of its own hands its time to its nearest ancestor that has nodes."""
    nodes: dict[str, list[str]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            nodes[module_of(n)].append(n.name)
    ms = {name: 0.0 for names in nodes.values() for name in names}
    for path, t in own.items():
        target: str | None = path
        while target is not None and target not in nodes:
            target = _parent(target)
        if target is None or not t:
            continue
        share = t / len(nodes[target])
        for name in nodes[target]:
            ms[name] += share
    return ms
