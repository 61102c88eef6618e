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
  real-versus-real floor: two disjoint real sets of the same n. Its uncertainty is given
  for the difference to the sequential sampler's FD, by a paired bootstrap
  (:func:`frechet_delta_ci`).
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


def frechet_delta_ci(a: Tensor | np.ndarray, ref: Tensor | np.ndarray,
                     real: Tensor | np.ndarray, *, resamples: int = 200, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """FD(a, real) − FD(ref, real) with a paired percentile bootstrap interval.

    ``a`` and ``ref`` are paired row by row (the same noise and label: an asynchronous
    sample and its sequential one); each resample draws the same rows of both. A bootstrap
    set repeats rows, which inflates its FD by an amount that depends on the set, so a
    bootstrap interval of FD itself sits beside the estimate rather than around it; in the
    paired difference that inflation largely cancels. ``real`` is held fixed.
    """
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    if a.shape != ref.shape:
        raise ValueError(f"paired sets: shapes {a.shape} and {ref.shape} differ")
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        idx = rng.integers(0, len(a), len(a))
        boot.append(frechet_distance(a[idx], real) - frechet_distance(ref[idx], real))
    q = (1 - level) / 2
    delta = frechet_distance(a, real) - frechet_distance(ref, real)
    return delta, float(np.quantile(boot, q)), float(np.quantile(boot, 1 - q))


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
