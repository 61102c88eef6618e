"""The sampling loop: a function of a denoiser, a scheduler, the start latent and the
conditioning. It knows nothing about devices (STYLE 1); the asynchronous runtime enters only
as a ``Denoiser``."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from schedulers.protocol import Denoiser, StepCallback


def _cfg_batch(cond: Mapping[str, Tensor], uncond: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if set(cond) != set(uncond):
        raise ValueError(f"uncond: keys {sorted(uncond)} must equal cond's keys {sorted(cond)}")
    return {name: torch.cat([uncond[name], cond[name]]) for name in cond}


@torch.no_grad()
def sample(denoiser: Denoiser, scheduler, x_T: Tensor, cond: Mapping[str, Tensor], *,
           steps: int, guidance_scale: float | None = None,
           uncond: Mapping[str, Tensor] | None = None,
           callback: StepCallback | None = None) -> Tensor:
    """Run ``steps`` steps of a diffusers-style ``scheduler`` from noise ``x_T``; return x_T's
    denoised latent.

    Each step k calls ``denoiser(scale_model_input(x_k, τ_k), τ_k, k, cond)`` once and applies
    ``scheduler.step`` (AsyncDiff §3.1, Eq. 4; the scheduler is deterministic: DDIM with η = 0,
    DPM-Solver++, Euler without churn). Classifier-free guidance is on exactly when
    ``guidance_scale`` is given (a scale of 1 still runs it): the denoiser is called once on the
    batch [uncond, cond] (latent duplicated, each conditioning tensor concatenated along dim 0,
    as diffusers pipelines do) and ε = ε_u + g·(ε_c − ε_u).
    """
    if (guidance_scale is None) != (uncond is None):
        raise ValueError("guidance_scale and uncond: give both (classifier-free guidance) "
                         "or neither")
    if guidance_scale is not None and uncond is not None:
        cond = _cfg_batch(cond, uncond)
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    for k, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if guidance_scale is None:
            eps = denoiser(x_in, t, k, cond)
        else:
            eps_u, eps_c = denoiser(torch.cat([x_in, x_in]), t, k, cond).chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample
        if callback is not None:
            callback({"step": k, "t": t, "x": x, "eps": eps})
    return x
