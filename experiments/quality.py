"""Set-level quality measures for the study (``experiments/study.py``): paired consistency per
sample, bootstrap confidence intervals, and the Fréchet distance.

[Note: quality metrics]
How these stand in for the paper's (AsyncDiff Tables 1, 2, 7 report LPIPS, FID, CLIP score):

* **Consistency** (the paper's LPIPS against the sequential sample of the same seed): PSNR and
  relative L2 of each asynchronous sample against the sequential sample from the same noise,
  label and sampler, images in [-1, 1] (PSNR's data range is 2; identical images give
  :data:`PSNR_CAP` dB, not infinity, so means stay finite). Per-sample values, mean with a
  percentile bootstrap interval over samples. No learned perceptual weights exist here.
* **Fréchet distance** (the paper's FID): the Fréchet distance between Gaussians fitted to
  the reference model's classifier features (its penultimate layer, as FID uses Inception's
  pool layer) of the samples and of real images. FD is biased upwards by a finite sample, by
  an amount that depends on n, so it is only compared at equal n and always next to the
  real-versus-real floor: two disjoint real sets of the same n.
* **Accuracy** (the paper's CLIP score, "does the image match its prompt"): the fraction of
  samples the classifier assigns to the class they were conditioned on. On the digits model it
  saturates near 100 % for every sampler, so it separates nothing there.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

PSNR_CAP = 100.0  # dB, for identical images (data range 2)


def psnr_per_sample(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR of each sample of ``x`` against the same sample of ``ref``, capped at
    :data:`PSNR_CAP` dB (float64, ``[n]``)."""
    mse = (x.double() - ref.double()).flatten(1).square().mean(1)
    out = 10 * torch.log10(data_range ** 2 / mse)
    return torch.where(mse > 0, out, torch.full_like(out, PSNR_CAP)).clamp(max=PSNR_CAP)


def relative_l2_per_sample(x: Tensor, ref: Tensor) -> Tensor:
    """‖x − ref‖ / ‖ref‖ per sample (float64, ``[n]``)."""
    d = (x.double() - ref.double()).flatten(1).norm(dim=1)
    return d / ref.double().flatten(1).norm(dim=1)


def bootstrap_ci(values: Tensor | np.ndarray, *, resamples: int = 2000, level: float = 0.95,
                 seed: int = 0, stat=np.mean) -> tuple[float, float, float]:
    """``(statistic, low, high)``: the statistic of ``values`` and its percentile bootstrap
    interval at ``level`` (resampling the values with replacement, ``resamples`` times)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"values: need a non-empty 1-d set, got shape {v.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))
    boot = stat(v[idx], axis=1)
    a = (1 - level) / 2
    return float(stat(v)), float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows are
    samples): ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½).

    tr((Σa Σb)^½) is computed as tr((Σa^½ Σb Σa^½)^½), a symmetric PSD square root (same
    eigenvalues), so the result is real and a set against itself gives 0 up to rounding.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"feature sets: need [n, d] with n >= 2 and equal d, got {a.shape} "
                         f"and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = _sqrtm_psd(ca)
    cross = np.trace(_sqrtm_psd(ra @ cb @ ra))
    fd = float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * cross)
    return max(fd, 0.0)


def frechet_ci(a: Tensor, b: Tensor, *, resamples: int = 200, level: float = 0.95,
               seed: int = 0) -> tuple[float, float, float]:
    """FD of ``a`` to ``b`` with a basic (reverse-percentile) bootstrap interval, resampling
    the generated set ``a`` (the reference set ``b`` is held fixed: it is the same for every
    row of a table).

    A resampled set repeats samples, which inflates its FD (fewer distinct points), so the
    percentile interval would sit above the estimate; the basic interval
    [2·FD − q_high, 2·FD − q_low] reflects the bootstrap spread around the estimate instead
    (clipped at 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = [frechet_distance(a[rng.integers(0, len(a), len(a))], b) for _ in range(resamples)]
    q = (1 - level) / 2
    fd = frechet_distance(a, b)
    lo, hi = float(np.quantile(boot, q)), float(np.quantile(boot, 1 - q))
    return fd, max(0.0, 2 * fd - hi), max(0.0, 2 * fd - lo)


def cosine_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of each sample of ``a`` with the same sample of ``b``, over all
    other dimensions (float64, ``[n]``)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def fmt_ci(m: tuple[float, float, float], digits: int = 2) -> str:
    """``mean [low, high]`` for tables."""
    if any(not math.isfinite(v) for v in m):
        return "–"
    return f"{m[0]:.{digits}f} [{m[1]:.{digits}f}, {m[2]:.{digits}f}]"
