"""Training pieces for the reference models: the ε-prediction loss with label dropout, the
learning-rate schedule, a classifier fit, and atomic checkpoints (the moving average of the
weights is diffusers' ``EMAModel``). Plain functions of modules, tensors and a ``torch.Generator`` (every draw
comes from it, so a resumed run continues the same random stream)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments import atomic


def diffusion_loss(unet: nn.Module, tokens: nn.Module, x0: Tensor, labels: Tensor,
                   noise_scheduler, g: torch.Generator, p_uncond: float,
                   null_class: int) -> Tensor:
    """DDPM's simple loss ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, c)‖² (Ho et al. 2020), t uniform
    over the training steps, with each label replaced by ``null_class`` with probability
    ``p_uncond`` (classifier-free guidance, Ho & Salimans 2022)."""
    n = x0.shape[0]
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(n, generator=g) < p_uncond
    labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    x_t = noise_scheduler.add_noise(x0, noise, t)
    eps = unet(x_t, t, encoder_hidden_states=tokens(labels), return_dict=False)[0]
    return F.mse_loss(eps, noise)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine from 1 down
    to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def random_shift(x: Tensor, pixels: int, g: torch.Generator, fill: float = -1.0) -> Tensor:
    """Translate each image by up to ``pixels`` in each direction, filling with ``fill``."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=fill)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=g)
    out = torch.empty_like(x)
    for a in range(2 * pixels + 1):  # one slice per offset, not per image
        for b in range(2 * pixels + 1):
            rows = ((dy == a) & (dx == b)).nonzero().flatten()
            out[rows] = padded[rows, :, a:a + h, b:b + w]
    return out


def fit_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch: int,
                   lr: float, shift: int, seed: int) -> nn.Module:
    """Adam with a cosine learning rate over ``epochs`` passes; random translations by up to
    ``shift`` pixels as augmentation."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(y) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, 0, 0.0))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            xb = random_shift(x[idx], shift, g) if shift else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Written whole or not at all: an interrupted save leaves the previous checkpoint."""
    atomic.save_torch(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    return torch.load(path, weights_only=False) if path.is_file() else None
