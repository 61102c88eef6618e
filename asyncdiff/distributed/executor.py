"""The executor of one rank: interprets its lowered program, round by round.

The program (``asyncdiff/lowering``) says, for every round, which of this rank's segments to
compute and which groups of messages to post in between; this file decides nothing about what
travels. It runs the same segments on the same inputs as the emulator
(``asyncdiff/emulate.py``), so the two are bit-exact ([Note: staleness] in
``asyncdiff/timeline.py``):

* a sequential round computes its segments in global order on fresh values: a ``fresh q``
  group delivers what segment q produced before the segments that read it compute;
* a parallel round computes on the values held from the round before;
* every round ends with ``publish`` (the values the next round reads, and ε to every rank)
  and, with CFG-parallel, ``guidance`` (the ε halves swapped with the other group).

Conditioning hoisted out of the loop (``partition/stages.py``) is computed before the first
round and again when the conditioning changes (``asyncdiff/hoisted.py``): the home rank
computes the values sent once per run, the ``hoist`` group delivers them, then each rank runs
its own prologues.

Nothing here synchronises the host with a GPU: timesteps are placed on the device before the
first round, round times are CUDA events read after the run (:attr:`stats`), and the
conditioning is compared by identity first.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from asyncdiff.distributed.transport import Transport
from asyncdiff.hoisted import OncePerRun
from asyncdiff.inputs import DTYPES, model_env, timestep_tensor
from asyncdiff.lowering import Compute, Group, RankProgram, stage_devices
from asyncdiff.timeline import Round, Timeline, stage_of_device
from partition.plan import Plan
from partition.stages import Segment


@dataclass
class RoundStats:
    """Timings of one round on one rank (seconds since the executor was made)."""

    round: int
    start: float
    computed: float
    done: float
    bytes_sent: int
    stage: int | None


class DistributedExecutor:
    """Runs ``program`` (this rank's lowered rounds of ``timeline``) with its own stage's
    ``segments``; ``guidance``: this rank's guidance group (0: uncond, 1: cond) with
    CFG-parallel, whose rounds return the whole batch's ε. ``hoist_inputs``: the model
    inputs every stage's prologues read (:func:`asyncdiff.hoisted.model_inputs_of` of the
    whole staged model), the same on every rank."""

    def __init__(self, segments: list[Segment], plan: Plan, timeline: Timeline,
                 timesteps: Sequence, program: RankProgram, specs, placeholders,
                 output: str, transport: Transport, torch_device: torch.device | str = "cpu",
                 guidance: int | None = None, hoist_inputs: Iterable[str] = ()):
        self.plan, self.timeline, self.program = plan, timeline, program
        self.transport, self.guidance = transport, guidance
        self.d = program.device
        self.stage = stage_of_device(self.d, plan.n)
        if any(s.stage != self.stage for s in segments):
            raise ValueError(f"device {self.d} runs stage {self.stage}; got other stages' "
                             "segments")
        self.segments = {s.start: s for s in segments if not s.prologue}
        sent = {h.name for h in plan.hoisted if h.home >= 0}
        prologues = [s for s in segments if s.prologue]
        sender = next((s for s in prologues if set(s.outputs) <= sent), None) if sent else None
        self.prologues = [s for s in prologues if s is not sender]
        # the sent values are computed on the home stage's first device only, and sent (its
        # stride copies receive them: [Note: lowering])
        runs = stage_devices(timeline)
        homes = {runs[h.home][0] for h in plan.hoisted if h.home >= 0 and h.home in runs}
        self.sender = sender if self.d in homes else None
        # a stride copy that never runs (every batch shorter than S) needs no hoisted values
        self.computes = any(isinstance(i, Compute) for items in program.rounds for i in items)
        # every rank of a pipeline tracks the same inputs, so all decide alike whether the
        # hoist group is posted again ([Note: lowering])
        self.once = OncePerRun(hoist_inputs)
        self.hoisted: dict[str, torch.Tensor] = {}
        self.specs, self.placeholders, self.output = specs, placeholders, output
        self.torch_device = torch.device(torch_device)
        # per step: the network's timestep input, placed on the device once (no copy inside
        # the loop); a drop-in stream's are read when first needed (asyncdiff/dropin/steps.py)
        self.timesteps = timesteps if not isinstance(timesteps, torch.Tensor) else \
            [float(t) for t in timesteps]  # as the emulator feeds them
        self._t_spec = next((s for s in specs if s.role == "timestep"), None)
        self._fed: dict[int, object] = {}
        if isinstance(self.timesteps, (list, tuple)):
            for k in range(len(self.timesteps)):
                self._timestep(k)
        self._shapes = {v.name: tuple(v.shape) for v in (*plan.values, *plan.hoisted)}
        # the prediction as the plan recorded it: a learned-σ network's narrowed ε, token
        # logits of another shape or dtype ([Note: denoiser contract])
        self.eps_shape = tuple(plan.output_shape)
        self.eps_dtype = DTYPES[plan.output_dtype]
        self.held: dict[str, torch.Tensor] = {}
        self._marks: list[tuple[int, object, object, object, int, int | None]] = []
        self._cuda = self.torch_device.type == "cuda"
        self.t0 = self._mark()

    # ------------------------------------------------------------------ clock
    def _mark(self):
        """Now: a CUDA event on the current stream (read after the run), else a float."""
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @property
    def stats(self) -> list[RoundStats]:
        """Per-round timings (on CUDA: the events, read now, after the rounds)."""
        if self._cuda and self._marks:
            torch.cuda.synchronize(self.torch_device)
        since = (lambda ev: self.t0.elapsed_time(ev) / 1e3) if self._cuda else \
            (lambda t: t - self.t0)
        return [RoundStats(r, since(a), since(b), since(c), sent, stage)
                for r, a, b, c, sent, stage in self._marks]

    # ------------------------------------------------------------------ one round
    def run_round(self, rnd: Round, x: torch.Tensor,
                  cond: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        start = self._mark()
        with torch.no_grad():
            hoist_bytes = self._hoist(x, cond, rnd.index)
            action = rnd.on(self.d)
            t_step = action.t_step if action is not None else rnd.steps[0]
            env: dict[str, torch.Tensor] = {**(self.held if not rnd.sequential else {}),
                                            **self._env(x, t_step, cond)}
            eps: dict[int, torch.Tensor] = {}
            received: dict[str, torch.Tensor] = {}
            computed = start
            for item in self.program.rounds[rnd.index]:
                if isinstance(item, Compute):
                    for s in item.segments:
                        env.update(self.segments[s](env))
                    computed = self._mark()
                    if action.eps_steps and self.output in env:
                        eps.update(dict.fromkeys(action.eps_steps, self._prediction(env)))
                else:
                    self._exchange(item, env, eps, received)
            # what the next round reads: received at this round's end, or (a sequential
            # round's consumers) received fresh during it
            inputs = self.plan.stages[self.stage].inputs
            self.held = {**({k: env[k] for k in inputs if k in env}
                            if rnd.sequential and action is not None else {}), **received}
        self._marks.append((rnd.index, start, computed, self._mark(),
                            self.program.bytes_sent(rnd.index) + hoist_bytes,
                            action.stage if action else None))
        return eps

    def _timestep(self, k: int):
        if k not in self._fed:
            t = self.timesteps[k]
            self._fed[k] = timestep_tensor(self._t_spec, t).to(self.torch_device) \
                if self._t_spec is not None else t
        return self._fed[k]

    def _env(self, x, t_step: int, cond) -> dict[str, torch.Tensor]:
        return {**model_env(self.specs, self.placeholders, x, self._timestep(t_step), cond),
                **self.hoisted}

    def _prediction(self, env) -> torch.Tensor:
        out = env[self.output]
        if tuple(out.shape) != self.eps_shape or out.dtype != self.eps_dtype:
            raise RuntimeError(f"rank {self.transport.rank}: prediction {tuple(out.shape)} "
                               f"{out.dtype} differs from the plan's {self.eps_shape} "
                               f"{self.eps_dtype}")
        return out

    # ------------------------------------------------------------------ messages
    def _exchange(self, group: Group, env: dict, eps: dict, received: dict) -> None:
        """Post ``group``, wait, and put what arrived where it belongs: a fresh value into
        ``env``, a value for the next round into ``received``, ε into ``eps``."""
        bufs = []
        for c in group.ops:
            p = c.payload
            if c.op == "send":
                bufs.append(self._outgoing(group, c, env, eps))
            else:
                shape = self.eps_shape if p.kind in ("eps", "half") else (p.numel,)
                bufs.append(torch.empty(shape, dtype=DTYPES[p.dtype],
                                        device=self.torch_device))
        self.transport.post(group, bufs).wait()
        halves: dict[tuple[int, ...], torch.Tensor] = {}
        for c, buf in zip(group.ops, bufs):
            p = c.payload
            if c.op == "send":
                continue
            if p.kind == "eps":
                for k in p.steps:
                    eps[k] = buf
            elif p.kind == "half":
                halves[p.steps] = buf
            else:
                target = env if group.phase.startswith("fresh") else received
                target.update(zip(p.names, _unpack(buf, [self._shape(n) for n in p.names])))
        for steps, other in halves.items():
            mine = eps[steps[0]]
            both = torch.cat([mine, other] if self.guidance == 0 else [other, mine])
            for k in steps:
                eps[k] = both

    def _outgoing(self, group: Group, c, env, eps) -> torch.Tensor:
        """What ``c`` sends, checked against its lowered payload (element count, dtype): a
        value of another dtype or shape would fail far away under gloo and arrive as garbage
        under NCCL."""
        p = c.payload
        if p.kind == "eps":
            out = _contiguous(env[self.output])
        elif p.kind == "half":
            out = _contiguous(eps[p.steps[0]])
        else:
            out = _pack([env[n] for n in p.names])
        if out.numel() != p.numel or out.dtype != DTYPES[p.dtype]:
            raise RuntimeError(
                f"rank {self.transport.rank}: round {group.round} {group.phase}: "
                f"{p.describe()} to rank {c.peer} holds {out.numel()} {out.dtype}, lowered as "
                f"{p.numel} {p.dtype} ({', '.join(p.names) or p.kind}): the stage computed "
                "values of another shape or dtype than it was planned with")
        return out

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    # ------------------------------------------------------------------ hoisted values
    def _hoist(self, x, cond, round_index: int) -> int:
        """The hoisted values, once per run and again when the conditioning changes; returns
        the bytes this rank sent for them."""
        if not (self.computes and (self.prologues or self.sender or self.program.hoist)):
            return 0
        env = model_env(self.specs, self.placeholders, x, self._timestep(0), cond)
        if not self.once.changed(env):
            return 0
        if self.sender is not None:
            env.update(self.sender(env))
        sent = 0
        if self.program.hoist is not None:
            got: dict[str, torch.Tensor] = {}
            group = dataclasses.replace(self.program.hoist, round=round_index)
            self._exchange(group, env, {}, got)
            env.update(got)
            sent = group.bytes_sent
        for seg in self.prologues:
            env.update(seg(env))
        names = {h.name for h in self.plan.hoisted}
        self.hoisted = {k: v for k, v in env.items() if k in names}
        self.hoisted.update({k: env[k] for seg in self.prologues for k in seg.outputs})
        return sent


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else \
        tensors[0].reshape(-1).contiguous()


def _unpack(buf: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        size = 1
        for s in shape:
            size *= s
        out.append(buf[offset:offset + size].view(shape))
        offset += size
    return out


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """Process groups send only contiguous memory (a narrowed ε, e.g. a learned-σ model's)."""
    return t if t.is_contiguous() else t.contiguous()
