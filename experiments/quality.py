"""Image quality: PSNR, SSIM and the Fréchet distance from torchmetrics, bootstrap intervals
from scipy. One implementation of each, one PSNR cap.

[Note: quality metrics]
How these stand in for the paper's (AsyncDiff Tables 1, 2, 7 report LPIPS, FID, CLIP score):

* **Consistency** (the paper's LPIPS against the sequential sample of the same seed): PSNR and
  relative L2 of each asynchronous sample against the sequential sample from the same noise,
  label and sampler, images in [-1, 1] (PSNR's data range is 2; identical images give
  :data:`PSNR_CAP` dB, not infinity, so means stay finite). Per-sample values, mean with a
  percentile bootstrap interval over samples (``scipy.stats.bootstrap``). A run's PSNR and SSIM
  (``asyncdiff-run``, the demo) are over the whole batch, with the reference's max − min as
  the data range. SSIM: Gaussian window 11, σ = 1.5, K1 = 0.01, K2 = 0.03 over the last two
  dimensions; inputs smaller than 11 use the largest odd window that fits, σ scaled alike.
* **Fréchet distance** (the paper's FID): torchmetrics' ``FrechetInceptionDistance`` with the
  reference model's classifier as its feature network (its penultimate layer, as FID uses
  Inception's pool layer), between the samples and real images. FD is biased upwards by a
  finite sample, by an amount that depends on n, so it is only compared at equal n and always
  next to the real-versus-real floor: two disjoint real sets of the same n. Its uncertainty is
  given for the difference to the sequential sampler's FD, by a paired bootstrap
  (:func:`frechet_delta_ci`).
* **Accuracy** (the paper's CLIP score, "does the image match its prompt"): the fraction of
  samples the classifier assigns to the class they were conditioned on. On the digits model it
  saturates near 100 % for every sampler, so it separates nothing there.

LPIPS, CLIP score and FID on Inception (``experiments/learned.py``) need pretrained networks;
they are computed where those are on the machine, and recorded as skipped with the reason
otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                           structural_similarity_index_measure)
from torchmetrics.image.fid import FrechetInceptionDistance

PSNR_CAP = 100.0  # dB: identical images (MSE 0) give this, not infinity
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def cap_psnr(values: Tensor, cap: float | None = PSNR_CAP) -> Tensor:
    """The one cap: +inf (identical images) and anything above ``cap`` become ``cap``."""
    return values if cap is None else values.clamp(max=cap)


def _range(ref: Tensor, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    span = float(ref.max() - ref.min())
    return span if span > 0 else 1.0


def psnr(x: Tensor, ref: Tensor, data_range: float | None = None,
         cap: float | None = PSNR_CAP) -> float:
    """PSNR in dB over the whole batch: 10·log10(R² / MSE), R = ``data_range`` (default: the
    reference's max − min); capped at ``cap``."""
    if x.shape != ref.shape:
        raise ValueError(f"psnr: shapes {tuple(x.shape)} and {tuple(ref.shape)} differ")
    value = peak_signal_noise_ratio(x.double(), ref.double(), data_range=_range(ref, data_range))
    return float(cap_psnr(value, cap))


def psnr_per_sample(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR of each sample of ``x`` against the same sample of ``ref``, capped at
    :data:`PSNR_CAP` dB (float64, ``[n]``)."""
    dims = tuple(range(1, x.dim()))
    value = peak_signal_noise_ratio(x.double(), ref.double(), data_range=data_range,
                                    reduction="none", dim=dims)
    return cap_psnr(value)


def ssim(x: Tensor, ref: Tensor, data_range: float | None = None) -> float:
    """Mean SSIM over the last two dimensions (every leading dimension a separate image)."""
    if x.shape != ref.shape:
        raise ValueError(f"ssim: shapes {tuple(x.shape)} and {tuple(ref.shape)} differ")
    if x.dim() < 2:
        raise ValueError(f"ssim: needs at least 2 dimensions, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    size = min(SSIM_WINDOW, h if h % 2 else h - 1, w if w % 2 else w - 1)
    a, b = (t.double().reshape(-1, 1, h, w) for t in (x, ref))
    return float(structural_similarity_index_measure(
        a, b, gaussian_kernel=True, kernel_size=size, sigma=SSIM_SIGMA * size / SSIM_WINDOW,
        data_range=_range(ref, data_range)))


def relative_l2(x: Tensor, ref: Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ (0 for identical inputs)."""
    den = float(ref.double().norm())
    num = float((x.double() - ref.double()).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def relative_l2_per_sample(x: Tensor, ref: Tensor) -> Tensor:
    """‖x − ref‖ / ‖ref‖ per sample (float64, ``[n]``)."""
    d = (x.double() - ref.double()).flatten(1).norm(dim=1)
    return d / ref.double().flatten(1).norm(dim=1)


def bootstrap_ci(values: Tensor | np.ndarray, *, resamples: int = 2000, level: float = 0.95,
                 seed: int = 0, stat=np.mean) -> tuple[float, float, float]:
    """``(statistic, low, high)``: the statistic of ``values`` and its percentile bootstrap
    interval at ``level`` (``scipy.stats.bootstrap``)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"values: need a non-empty 1-d set, got shape {v.shape}")
    if np.all(v == v[0]):  # a constant set (every PSNR capped): its interval is the point
        return float(stat(v)), float(v[0]), float(v[0])
    res = stats.bootstrap((v,), stat, n_resamples=resamples, confidence_level=level,
                          method="percentile", random_state=seed, vectorized=True, axis=0)
    return float(stat(v)), float(res.confidence_interval.low), \
        float(res.confidence_interval.high)


class FeatureRows(nn.Module):
    """The feature network of a Fréchet distance over features already computed: its input
    rows are the features (``num_features`` spares torchmetrics a probe forward)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, rows: Tensor) -> Tensor:
        return rows


def frechet(feature: nn.Module, num_features: int | None = None) -> FrechetInceptionDistance:
    """torchmetrics' FID on ``feature`` (a classifier's penultimate layer, or
    :class:`FeatureRows`), in float64; the real set's statistics survive ``reset()``."""
    if num_features is not None and not hasattr(feature, "num_features"):
        feature.num_features = num_features
    return FrechetInceptionDistance(feature=feature, reset_real_features=False).double()


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows are
    samples): ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½), torchmetrics' FID on the rows."""
    a, b = _rows(a), _rows(b)
    if a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"feature sets: need [n, d] with n >= 2 and equal d, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    fid = frechet(FeatureRows(a.shape[1]))
    fid.update(b, real=True)
    fid.update(a, real=False)
    return max(float(fid.compute()), 0.0)


def _rows(x) -> Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if t.dim() != 2:
        raise ValueError(f"feature sets: need [n, d], got shape {tuple(t.shape)}")
    return t


def frechet_delta_ci(a: Tensor | np.ndarray, ref: Tensor | np.ndarray,
                     real: Tensor | np.ndarray, *, resamples: int = 200, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """FD(a, real) − FD(ref, real) with a paired percentile bootstrap interval.

    ``a`` and ``ref`` are paired row by row (the same noise and label: an asynchronous
    sample and its sequential one); each resample draws the same rows of both
    (``scipy.stats.bootstrap(paired=True)``). A bootstrap set repeats rows, which inflates its
    FD by an amount that depends on the set, so an interval of FD itself would sit beside the
    estimate rather than around it; in the paired difference that inflation largely cancels.
    ``real`` is held fixed (its statistics are computed once).
    """
    a, ref, real = _rows(a), _rows(ref), _rows(real)
    if a.shape != ref.shape:
        raise ValueError(f"paired sets: shapes {tuple(a.shape)} and {tuple(ref.shape)} differ")
    fid = frechet(FeatureRows(real.shape[1]))
    fid.update(real, real=True)

    def fd(rows: Tensor) -> float:
        fid.reset()
        fid.update(rows, real=False)
        return float(fid.compute())

    def delta(ia: np.ndarray, ir: np.ndarray) -> float:
        return fd(a[torch.as_tensor(ia)]) - fd(ref[torch.as_tensor(ir)])

    idx = np.arange(len(a))
    estimate = delta(idx, idx)
    if torch.equal(a, ref):  # a set against itself: exactly 0, in every resample
        return 0.0, 0.0, 0.0
    res = stats.bootstrap((idx, idx), delta, paired=True, vectorized=False,
                          n_resamples=resamples, confidence_level=level, method="percentile",
                          random_state=seed)
    return estimate, float(res.confidence_interval.low), float(res.confidence_interval.high)


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
