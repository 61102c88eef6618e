"""Pictures of latents, for models run without a VAE (every tiny model, and any model whose
decoder is not loaded): the first three latent channels as RGB, sequential next to
asynchronous next to their difference, for the same seed; and image grids for the trained
reference models, whose latent is the image.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from experiments import atomic


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


def _finish(fig, path: Path, title: str) -> Path:
    """Title, layout, write the PNG (creating its folder), close the figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


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
    return _finish(fig, path, title)


def save_image_grid(rows: dict[str, torch.Tensor], path: Path, title: str = "",
                    captions: list[str] | None = None, diff: bool = True) -> Path:
    """PNG: one row per entry of ``rows`` (name -> images ``[n, C, H, W]`` in [-1, 1], C = 1
    or 3), one column per sample, and a last row of |first − second| (scaled to its max)
    when there are two rows and ``diff`` (paired rows: the same noise and label). For models whose latent is the image (the trained reference
    models)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, imgs = list(rows), [r.detach().float().cpu().clamp(-1, 1) for r in rows.values()]
    if len(imgs) == 2 and diff:
        diff = (imgs[0] - imgs[1]).abs()
        peak = float(diff.max())
        names.append(f"|diff| (max {peak:.3g})")
        imgs.append(diff / (peak or 1.0) * 2 - 1)
    n = imgs[0].shape[0]
    fig, axes = plt.subplots(len(imgs), n, figsize=(0.9 * n + 1.2, 0.95 * len(imgs) + 0.5),
                             squeeze=False)
    for r, (name, batch) in enumerate(zip(names, imgs)):
        for c in range(n):
            ax = axes[r][c]
            im = ((batch[c] + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
            if r == 0 and captions:
                ax.set_title(captions[c], fontsize=7)
    return _finish(fig, path, title)
