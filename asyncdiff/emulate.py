"""Single-process execution of a timeline: the quality-research executor (no devices).

Its numerics are those of the distributed executor by construction — the same segment
modules run on the same inputs in the same order per device — and the tests hold the two
bit-exact. Staleness follows [Note: staleness] in ``asyncdiff/timeline.py``. What the
devices would send is read from the same lowering the distributed executor interprets
(``asyncdiff/lowering``): :attr:`Emulator.bytes_sent`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from asyncdiff.hoisted import OncePerRun, model_inputs_of
from asyncdiff.inputs import model_env
from asyncdiff.lowering import lower
from asyncdiff.timeline import Round, Timeline
from partition.plan import Plan
from partition.stages import StagedModel


@dataclass
class RunRecord:
    """What one action actually consumed: for the hand-worked tests and the timeline plots."""

    round: int
    device: int
    stage: int
    t_fed: float  # the first entry of what the network was fed
    latent_step: int
    value_rounds: dict[str, int] = field(default_factory=dict)  # value -> round it was made in


class Emulator:
    """Executes ``timeline`` with ``staged`` in one process, round by round."""

    def __init__(self, staged: StagedModel, plan: Plan, timeline: Timeline,
                 timesteps: Sequence[float | torch.Tensor] | torch.Tensor, record: bool = False):
        if plan.n != timeline.n or staged.n != plan.n:
            raise ValueError(f"plan has n={plan.n}, timeline n={timeline.n}: they must agree")
        if len(timesteps) != timeline.steps:
            raise ValueError(f"{len(timesteps)} timesteps for a timeline of {timeline.steps} steps")
        self.staged, self.plan, self.timeline = staged, plan, timeline
        # per step: the number the network is fed, or the exact tensor (see inputs.py)
        self.timesteps = timesteps if not isinstance(timesteps, torch.Tensor) else \
            [float(t) for t in timesteps]
        self.produced_by = {s.index: s.outputs for s in plan.stages}
        self.cross = tuple(v.name for v in plan.values)
        self.published: dict[int, dict[str, torch.Tensor]] = {}  # round -> its values
        self.read_later = _read_later(timeline)
        self.record = record
        self.log: list[RunRecord] = []
        self.once = OncePerRun(model_inputs_of(staged.prologues, staged.placeholders))
        self.hoisted: dict[str, torch.Tensor] = {}
        self.comm = lower(timeline, plan)
        self.bytes_sent = [0] * timeline.devices  # per device, as the executor would send

    def _count(self, round_index: int | None) -> None:
        """Add what each device sends in round ``round_index`` (None: the hoist group)."""
        for p in self.comm.programs:
            if round_index is not None:
                self.bytes_sent[p.device] += p.bytes_sent(round_index)
            elif p.hoist is not None:
                self.bytes_sent[p.device] += p.hoist.bytes_sent

    def _env(self, x, t_step: int, cond) -> dict[str, torch.Tensor]:
        env = model_env(self.staged.specs, self.staged.placeholders, x,
                        self.timesteps[t_step], cond)
        if self.staged.prologues and self.once.changed(env):  # once per run (hoisted.py)
            self.hoisted = {k: v for k, v in self.staged.prepare(env).items() if k not in env}
            self._count(None)
        return {**env, **self.hoisted}

    def run_round(self, rnd: Round, x: torch.Tensor,
                  cond: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        self._count(rnd.index)
        with torch.no_grad():
            return self._warmup(rnd, x, cond) if rnd.sequential else self._parallel(rnd, x, cond)

    def _warmup(self, rnd: Round, x, cond) -> dict[int, torch.Tensor]:
        # Every stage on fresh values, in execution order (a shell's suffix after the core).
        k = rnd.steps[0]  # a second step: official's load-only step, the same ε
        env = self._env(x, k, cond)
        for seg in self.staged.segments:
            env.update(seg(env))
        self._publish(rnd.index, {name: env[name] for name in self.cross})
        if self.record:
            for a in rnd.actions:
                self.log.append(RunRecord(rnd.index, a.device, a.stage,
                                          _first(self.timesteps[k]), k,
                                          {v: rnd.index for v in self._inputs_of(a.stage)}))
        return {step: env[self.staged.output] for step in rnd.steps}

    def _parallel(self, rnd: Round, x, cond) -> dict[int, torch.Tensor]:
        # Each run reads the values published by the round the timeline names
        # (``inputs_round``): r−1 for the rules of [Note: staleness].
        current: dict[str, torch.Tensor] = {}
        eps = {}
        for a in rnd.actions:
            source = current if a.inputs_round == rnd.index else \
                self.published.get(a.inputs_round, {}) if a.inputs_round is not None else {}
            env = {**source, **self._env(x, a.t_step, cond)}
            for seg in self.staged.stage_segments(a.stage):
                env.update(seg(env))
            if a.publishes:
                current.update({name: env[name] for name in self.produced_by[a.stage]})
            for k in a.eps_steps:
                eps[k] = env[self.staged.output]
            if self.record:
                self.log.append(RunRecord(rnd.index, a.device, a.stage,
                                          _first(self.timesteps[a.t_step]),
                                          a.latent_step, {v: a.inputs_round
                                                          for v in self._inputs_of(a.stage)}))
        self._publish(rnd.index, current)
        return eps

    def _publish(self, index: int, values: dict[str, torch.Tensor]) -> None:
        self.published[index] = values
        for old in [r for r in self.published if r not in self.read_later[index]]:
            del self.published[old]  # no later round reads it

    def _inputs_of(self, stage: int) -> tuple[str, ...]:
        return self.plan.stages[stage].inputs


def _read_later(tl: Timeline) -> list[set[int]]:
    """Per round i: the rounds whose published values rounds after i read (r−1 in a
    pipeline; the last sequential round in a step cache)."""
    out: list[set[int]] = []
    later: set[int] = set()
    for rnd in reversed(tl.rounds):
        out.append(later | {rnd.index})
        later = later | {a.inputs_round for a in rnd.actions if a.inputs_round is not None}
    return out[::-1]


def _first(t) -> float:
    return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
