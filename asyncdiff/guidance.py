"""CFG-parallel: the two halves of the classifier-free guidance batch on two device groups.

The sampler (``schedulers/sampling.py``) calls its denoiser once per step on the batch
[uncond, cond] (latent duplicated, conditioning concatenated along dim 0, as diffusers
pipelines do). CFG-parallel hands each half to its own denoiser, one per *guidance group*,
and concatenates the two ε halves before the guidance combination and the scheduler step:

* group 0 (the unconditional half) and group 1 (the conditional half) each run a whole
  model (N = 1: plain CFG-parallel, 2 devices) or an asynchronous pipeline of N−1+S devices
  (the hybrid, 2·(N−1+S) devices). Each group's pipeline is the plain pipeline of
  [Note: staleness] on its half: the same timeline, the same stale values, nothing shared
  between the groups but ε, exchanged once per round (every step of it).
* Exactness: a half run as its own batch is bit-exact with the same half run as its own
  call of the sequential model (:class:`GuidanceSplit` of two sequential denoisers: the
  reference CFG-parallel is tested against), not with the batched call, whose
  kernels may block the batch differently (``docs/results/cfg_split_exactness.txt``: a few
  1e-6 relative).

:class:`GuidanceSplit` runs both halves in one process (the emulator, the reference);
:class:`GuidanceHalf` is one rank's side of the distributed run: its own half; its executor
swaps the ε halves with the rank at the same place in the other group, as lowered.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from schedulers.protocol import Denoiser


def guidance_half(x: torch.Tensor, cond: Mapping[str, torch.Tensor],
                  group: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Group ``group``'s half (0: uncond, 1: cond) of the batch [uncond, cond]."""
    if x.shape[0] % 2:
        raise ValueError(f"CFG-parallel: a batch of {x.shape[0]}; allowed: an even batch, the "
                         "guidance batch [uncond, cond]")
    return x[_rows(x.shape[0], group)], half_of(cond, x.shape[0], group)


def half_of(tensors: Mapping[str, torch.Tensor], batch: int,
            group: int) -> dict[str, torch.Tensor]:
    """Half ``group`` of every tensor whose dim 0 is ``batch`` (even); the rest shared."""
    sl = _rows(batch, group)
    return {k: v[sl] if v.dim() and v.shape[0] == batch else v for k, v in tensors.items()}


def _rows(batch: int, group: int) -> slice:
    return slice(group * batch // 2, (group + 1) * batch // 2)


class GuidanceSplit:
    """Both guidance halves in one process: ``denoisers[g]`` gets half g; ε = [ε_u, ε_c]."""

    def __init__(self, denoisers: Sequence[Denoiser]):
        if len(denoisers) != 2:
            raise ValueError(f"GuidanceSplit: {len(denoisers)} denoisers; allowed: 2 "
                             "(uncond, cond)")
        self.denoisers = tuple(denoisers)

    def __call__(self, x, t, step, cond):
        return torch.cat([den(*_call(x, cond, g, t, step)) for g, den in
                          enumerate(self.denoisers)])


def _call(x, cond, group, t, step):
    xh, ch = guidance_half(x, cond, group)
    return xh, t, step, ch


class GuidanceHalf:
    """One rank of a CFG-parallel run: feeds ``denoiser`` (this group's pipeline) this rank's
    guidance half. Its executor swaps the ε halves with the rank at the same place in the
    other group, as lowered (the ``guidance`` group of each round, ``asyncdiff/lowering``),
    so every rank gets [ε_u, ε_c]."""

    def __init__(self, denoiser: Denoiser, group: int):
        if group not in (0, 1):
            raise ValueError(f"guidance group {group}; allowed: 0 (uncond), 1 (cond)")
        self.denoiser, self.group = denoiser, group

    def __call__(self, x, t, step, cond):
        return self.denoiser(*_call(x, cond, self.group, t, step))
