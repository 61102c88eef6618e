"""Pictures of latents, for models run without a VAE (every tiny model, and any model whose
decoder is not loaded): the first three latent channels as RGB, sequential next to
asynchronous next to their difference, for the same seed.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


def latent_rgb(x: torch.Tensor) -> torch.Tensor:
    """One sample's latent as an ``[H, W, 3]`` image (unnormalised).

    ``x`` is a batch; sample 0 is shown. ``[C, H, W]`` (and video ``[C, F, H, W]`` /
    ``[F, C, H, W]``, whose leading dims are flattened) shows its first three planes; a
    token sequence ``[L, D]`` with square L (DiT-style patches) is folded to ``[D, √L, √L]``,
    any other ``[L, D]`` is shown as a grey L × D matrix. Fewer than three planes repeat.
    """
    x = x.detach().float().cpu()[0]
    if x.dim() == 1:
        x = x[None]
    if x.dim() == 2:
        side = math.isqrt(x.shape[0])
        x = (x.T.reshape(x.shape[1], side, side) if side * side == x.shape[0] and side > 1
             else x[None])
    planes = x.reshape(-1, *x.shape[-2:])
    idx = [min(i, planes.shape[0] - 1) for i in range(3)]
    return planes[idx].permute(1, 2, 0)


def save_latent_comparison(seq: torch.Tensor, par: torch.Tensor, path: Path,
                           title: str = "") -> Path:
    """PNG: sequential | asynchronous | |difference|, one colour scale for the first two."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = latent_rgb(seq), latent_rgb(par)
    lo, hi = float(a.min()), float(a.max())
    scale = (hi - lo) or 1.0

    def norm(t):
        return ((t - lo) / scale).clamp(0, 1).numpy()

    diff = (a - b).abs()
    diff = (diff / (float(diff.max()) or 1.0)).numpy()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    names = ("sequential", "asyncdiff", f"|diff| (max {float((a - b).abs().max()):.3g})")
    for ax, img, name in zip(axes, (norm(a), norm(b), diff), names):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
