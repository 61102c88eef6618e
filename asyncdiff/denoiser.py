"""Denoisers the sampler sees (``schedulers.Denoiser``): sequential, and the async pipeline.

The sampler calls the denoiser once per step, in order. A pipeline round covers one or
several steps and is started by the call for its first step; the ε of the round's later
steps are handed out by the calls that follow (the latents passed with those calls are not
fed to the network: a round sees the latent of its first step, see [Note: staleness]).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from asyncdiff.hoisted import OncePerRun, model_inputs_of
from asyncdiff.inputs import model_env
from asyncdiff.timeline import Round, Timeline
from partition.stages import StagedModel


class RoundExecutor(Protocol):
    """Runs one round of a timeline; returns ε for each of the round's steps."""

    timeline: Timeline

    def run_round(self, rnd: Round, x: torch.Tensor,
                  cond: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]: ...


class SequentialDenoiser:
    """The whole model, every step, fed τ_k: the reference every executor is compared with.
    Like them it computes the hoisted conditioning once per run (``asyncdiff/hoisted.py``),
    so a speedup measured against it is the pipeline's alone."""

    def __init__(self, staged: StagedModel):
        self.staged = staged
        self.once = OncePerRun(model_inputs_of(staged.prologues, staged.placeholders))
        self.hoisted: dict[str, torch.Tensor] = {}

    def __call__(self, x, t, step, cond):
        with torch.no_grad():
            env = model_env(self.staged.specs, self.staged.placeholders, x, t, cond)
            if self.staged.prologues and self.once.changed(env):
                self.hoisted = {k: v for k, v in self.staged.prepare(env).items()
                                if k not in env}
            env.update(self.hoisted)
            for seg in self.staged.segments:
                env.update(seg(env))
            return env[self.staged.output]


class PipelineDenoiser:
    """Adapts a round executor to the per-step denoiser protocol."""

    def __init__(self, executor: RoundExecutor):
        self.executor = executor
        self.timeline = executor.timeline
        self._pending: dict[int, torch.Tensor] = {}

    def __call__(self, x, t, step, cond):
        if step not in self._pending:
            rnd = self.timeline.round_of(step)
            if rnd.steps[0] != step:
                raise RuntimeError(f"step {step} called before the start of its round {rnd.steps}")
            self._pending = self.executor.run_round(rnd, x, cond)
        return self._pending.pop(step)

