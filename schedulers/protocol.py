"""The one shape of a denoiser, and the one payload a sampling callback receives (STYLE 7)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, TypedDict, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """Predicts the noise ε for latent ``x`` at timestep ``t``.

    ``t`` is the scheduler's timestep τ_step (a 0-d tensor), ``step`` its index k in the
    sampler's timesteps, and ``cond`` the conditioning inputs by name (dotted names are nested
    keyword inputs, see ``partition.spec.nest``). A plain model ignores ``step``; the
    asynchronous runtime uses it to find its place in the timeline, and may feed the network a
    different timestep from ``t`` (time shift, stride; see [Note: staleness] in
    ``asyncdiff/timeline.py``). The scheduler always uses τ_step.
    """

    def __call__(self, x: Tensor, t: Tensor, step: int, cond: Mapping[str, Tensor]) -> Tensor: ...


class StepInfo(TypedDict):
    """What a ``StepCallback`` sees after each step: step k, τ_k, the updated latent x_{k+1}
    and the ε the scheduler was given (after classifier-free guidance)."""

    step: int
    t: Tensor
    x: Tensor
    eps: Tensor


StepCallback = Callable[[StepInfo], None]
