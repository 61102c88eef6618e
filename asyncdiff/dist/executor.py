"""The executor of one device: its stage's segments, and the messages of each round.

Walks the same timeline as the emulator (``asyncdiff/emulate.py``) and follows
[Note: staleness] in ``asyncdiff/timeline.py``. Per round:

* warm-up: segments run in global execution order, each on its stage's device; a value
  produced on one device goes straight to the devices of the stages that read it (fresh);
  the stride copies of the last stage, idle in warm-up, receive the last stage's inputs
  at the end of the round.
* parallel: receives for the next round's inputs and for ε are posted first, the stage
  runs on the values held from the previous round, then its outputs go to the devices that
  run their consumer stages next round, and ε to every device — so transfers overlap the
  compute of the other devices.

Conditioning hoisted out of the loop (``partition/stages.py``) is computed before the first
round, and again when its inputs change (``asyncdiff/hoisted.py``): the home device computes
the values sent once per run and sends them to every device of a stage that reads them; then
each device runs its own stage's prologue.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from asyncdiff.dist.comm import (TAG_EPS, TAG_HOISTED, TAG_VALUES, TAG_WARMUP, Pending, pack,
                                 recv_now, unpack)
from asyncdiff.hoisted import OncePerRun, model_inputs_of
from asyncdiff.inputs import DTYPES, model_env
from asyncdiff.timeline import Round, Timeline, stage_of_device
from partition.plan import Plan, ValuePlan
from partition.stages import Segment


@dataclass
class RoundStats:
    """Timings of one round on one device (seconds since the executor was made)."""

    round: int
    start: float
    computed: float
    done: float
    bytes_sent: int
    stage: int | None


class DistributedExecutor:
    """Runs the rounds of ``timeline`` for pipeline device ``device`` (global rank base+device)."""

    def __init__(self, segments: list[Segment], plan: Plan, timeline: Timeline,
                 timesteps: Sequence, device: int, base_rank: int, specs, placeholders,
                 output: str, torch_device: torch.device | str = "cpu"):
        self.plan, self.timeline, self.d, self.base = plan, timeline, device, base_rank
        self.stage = stage_of_device(device, plan.n)
        if any(s.stage != self.stage for s in segments):
            raise ValueError(f"device {device} runs stage {self.stage}; got other stages' segments")
        self.segments = sorted((s for s in segments if not s.prologue), key=lambda s: s.start)
        self.sent = [(i, h) for i, h in enumerate(plan.hoisted) if h.home >= 0]
        sent_names = {h.name for _, h in self.sent}
        prologues = [s for s in segments if s.prologue]
        self.sender = next((s for s in prologues if set(s.outputs) <= sent_names), None)
        self.prologues = [s for s in prologues if s is not self.sender]
        self.once = OncePerRun(model_inputs_of(prologues, placeholders) if prologues or
                               self.sent else ())
        self.hoisted: dict[str, torch.Tensor] = {}
        # per step: the number the network is fed, or the exact tensor (asyncdiff/inputs.py)
        self.timesteps = timesteps if not isinstance(timesteps, torch.Tensor) else \
            [float(t) for t in timesteps]
        self.specs, self.placeholders, self.output = specs, placeholders, output
        self.torch_device = torch.device(torch_device)
        # the prediction as the plan recorded it: a learned-σ network's narrowed ε, token
        # logits of another shape or dtype ([Note: denoiser contract])
        self.eps_shape = tuple(plan.output_shape)
        self.eps_dtype = DTYPES[plan.output_dtype]
        self.held: dict[str, torch.Tensor] = {}
        self.stats: list[RoundStats] = []
        self.t0 = time.perf_counter()
        self.global_segments = sorted((sg.start, st.index) for st in plan.stages
                                      for sg in st.segments)
        self.value_index = {v.name: i for i, v in enumerate(plan.values)}

    # ------------------------------------------------------------------ helpers
    @property
    def rank(self) -> int:
        return self.base + self.d

    def _rank(self, device: int) -> int:
        return self.base + device

    def _env(self, x, t_step: int, cond) -> dict[str, torch.Tensor]:
        return {**model_env(self.specs, self.placeholders, x, self.timesteps[t_step], cond),
                **self.hoisted}

    def _prologue(self, x, cond) -> None:
        """The hoisted values, once per run (module docstring)."""
        if not (self.prologues or self.sent):
            return
        env = model_env(self.specs, self.placeholders, x, self.timesteps[0], cond)
        if not self.once.changed(env):
            return
        pending = Pending(self.rank)
        got: dict[str, torch.Tensor] = {}
        home = self.sent[0][1].home if self.sent else None
        if self.sent and self.d == home:  # the home stage's first device computes and sends
            got = self.sender(env)
            for i, h in self.sent:
                for dev in range(self.timeline.devices):
                    if dev != self.d and stage_of_device(dev, self.plan.n) in h.consumers:
                        pending.send(got[h.name], self._rank(dev), TAG_HOISTED + i)
        else:
            for i, h in self.sent:
                if self.stage in h.consumers:
                    buf = torch.empty(h.shape, dtype=DTYPES[h.dtype], device=self.torch_device)
                    pending.recv(buf, self._rank(home), TAG_HOISTED + i)
                    got[h.name] = buf
        pending.wait()
        env.update(got)
        for seg in self.prologues:
            env.update(seg(env))
        self.hoisted = {k: env[k] for k in got}
        self.hoisted.update({k: env[k] for seg in self.prologues for k in seg.outputs})

    def _run_segment(self, seg: Segment, env: dict) -> None:
        env.update(seg(env))

    def _dtype(self, v: ValuePlan) -> torch.dtype:
        return DTYPES[v.dtype]

    def _groups(self, values: list[ValuePlan]) -> list[tuple[str, list[ValuePlan]]]:
        by: dict[str, list[ValuePlan]] = {}
        for v in values:
            by.setdefault(v.dtype, []).append(v)
        return sorted(by.items())

    def _eps_buffer(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(self.eps_shape, dtype=self.eps_dtype, device=x.device)

    # ------------------------------------------------------------------ rounds
    def run_round(self, rnd: Round, x: torch.Tensor,
                  cond: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        start = time.perf_counter() - self.t0
        with torch.no_grad():
            self._prologue(x, cond)
            if rnd.sequential:
                eps, computed, sent = self._warmup(rnd, x, cond)
            else:
                eps, computed, sent = self._parallel(rnd, x, cond)
        action = rnd.on(self.d)
        self.stats.append(RoundStats(rnd.index, start, computed - self.t0,
                                     time.perf_counter() - self.t0, sent,
                                     action.stage if action else None))
        return eps

    def _next_round(self, rnd: Round) -> Round | None:
        i = rnd.index + 1
        return self.timeline.rounds[i] if i < len(self.timeline.rounds) else None

    def _warmup(self, rnd: Round, x, cond):
        k = rnd.steps[0]  # a second step: official's load-only step, the same ε
        n = self.plan.n
        values = self.plan.values
        active = self.d <= n - 1
        pending = Pending(self.rank)
        env: dict[str, torch.Tensor] = self._env(x, k, cond) if active else {}
        mine = {sg.start: sg for sg in self.segments} if active else {}
        for start, st in self.global_segments:
            if st != self.stage or start not in mine:
                continue
            for i, v in enumerate(values):
                if self.stage in v.consumers and v.position < start and v.name not in env:
                    env[v.name] = recv_now(v.shape, self._dtype(v), self._rank(v.producer),
                                           TAG_WARMUP + i, self.rank, self.torch_device)
            seg = mine[start]
            self._run_segment(seg, env)
            for i, v in enumerate(values):
                if v.producer == self.stage and seg.start <= v.position < seg.stop:
                    for c in v.consumers:
                        pending.send(env[v.name], self._rank(c), TAG_WARMUP + i)
        computed = time.perf_counter()
        # the stride copies of the last stage were idle: hand them the values they read next
        nxt = self._next_round(rnd)
        copies = [a.device for a in nxt.actions if a.copy > 0] if nxt and not nxt.sequential else []
        need_last = [v for v in values if n - 1 in v.consumers]
        if active:
            for i, v in enumerate(need_last):
                if v.producer == self.stage:
                    for dev in copies:
                        pending.send(env[v.name], self._rank(dev), TAG_WARMUP + self.value_index[v.name])
        recvd = {}
        if self.d in copies:
            for v in need_last:
                buf = torch.empty(v.shape, dtype=self._dtype(v), device=self.torch_device)
                pending.recv(buf, self._rank(v.producer), TAG_WARMUP + self.value_index[v.name])
                recvd[v.name] = buf
        # ε_k from the last stage's device to every other device
        src = n - 1
        if self.d == src:
            eps = env[self.output]
            for dev in range(self.timeline.devices):
                if dev != src:
                    pending.send(eps, self._rank(dev), TAG_EPS)
        else:
            eps = self._eps_buffer(x)
            pending.recv(eps, self._rank(src), TAG_EPS)
        pending.wait()
        inputs = self.plan.stages[self.stage].inputs
        self.held = {name: env[name] for name in inputs} if active else recvd
        return {step: eps for step in rnd.steps}, computed, pending.bytes_sent

    def _parallel(self, rnd: Round, x, cond):
        action = rnd.on(self.d)
        nxt = self._next_round(rnd)
        pending = Pending(self.rank)
        incoming: list[tuple[list[ValuePlan], torch.Tensor]] = []
        mine_next = nxt.on(self.d) if nxt is not None else None
        if mine_next is not None:
            need = [v for v in self.plan.values if mine_next.stage in v.consumers]
            by_src: dict[int, list[ValuePlan]] = {}
            for v in need:
                by_src.setdefault(rnd.publisher(v.producer).device, []).append(v)
            for src in sorted(by_src):
                for dtype, vals in self._groups(by_src[src]):
                    numel = sum(_numel(v.shape) for v in vals)
                    buf = torch.empty(numel, dtype=DTYPES[dtype], device=self.torch_device)
                    pending.recv(buf, self._rank(src), TAG_VALUES)
                    incoming.append((vals, buf))
        eps: dict[int, torch.Tensor] = {}
        eps_sources = sorted({rnd.eps_source(k) for k in rnd.steps}, key=lambda a: a.device)
        for a in eps_sources:
            if a.device != self.d:
                buf = self._eps_buffer(x)
                pending.recv(buf, self._rank(a.device), TAG_EPS + a.copy)
                for k in a.eps_steps:
                    eps[k] = buf
        if action is not None:
            env = {**self.held, **self._env(x, action.t_step, cond)}
            for seg in self.segments:
                self._run_segment(seg, env)
            computed = time.perf_counter()
            if action.publishes and nxt is not None:
                produced = [v for v in self.plan.values if v.producer == self.stage]
                for na in nxt.actions:
                    vals = [v for v in produced if na.stage in v.consumers]
                    for _dtype, group in self._groups(vals):
                        pending.send(pack([env[v.name] for v in group]), self._rank(na.device),
                                     TAG_VALUES)
            if action.eps_steps:
                out = env[self.output]
                if tuple(out.shape) != self.eps_shape or out.dtype != self.eps_dtype:
                    raise RuntimeError(f"rank {self.rank}: prediction {tuple(out.shape)} "
                                       f"{out.dtype} differs from the plan's {self.eps_shape} "
                                       f"{self.eps_dtype}")
                for dev in range(self.timeline.devices):
                    if dev != self.d:
                        pending.send(out, self._rank(dev), TAG_EPS + action.copy)
                for k in action.eps_steps:
                    eps[k] = out
        else:
            computed = time.perf_counter()
        pending.wait()
        held = {}
        for vals, buf in incoming:
            held.update(zip((v.name for v in vals), unpack(buf, [v.shape for v in vals])))
        self.held = held
        return eps, computed, pending.bytes_sent


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
