"""Metrics of a run: pure functions of tensors, timings and the plan.

Quality is measured against the *sequential* sampler's output for the same seed (the
paper's protocol: AsyncDiff §4.1 reports PSNR/SSIM/LPIPS of the parallel result against the
original model's). On the tiny random-weight models this is drift, not image quality.

Conventions, stated once:

* MACs: a multiply-add counts 1 (the plan's ``macs`` = FLOPs / 2).
* PSNR of identical inputs is +inf mathematically; :func:`psnr` caps it at
  ``PSNR_CAP_DB`` (100 dB: an MSE of 1e-10 of the squared range, far below float32
  round-off) so tables, JSON and plots stay finite. ``cap=None`` returns inf.
* The data range of PSNR and SSIM defaults to the reference's max − min.
* SSIM (Wang et al. 2004) uses an 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03,
  no padding, over the last two dimensions (every leading dimension is a separate channel,
  averaged). Inputs smaller than 11 in H or W use the largest odd window that fits, with σ
  scaled by the same factor.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from asyncdiff.timeline import stage_of_device

PSNR_CAP_DB = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


# --------------------------------------------------------------------------- time


def latency_summary(samples_s: Sequence[float]) -> dict[str, float]:
    """Median, mean, min, max and sample standard deviation of repeated latencies (s)."""
    if not samples_s:
        raise ValueError("latency_summary: no samples")
    xs = [float(x) for x in samples_s]
    return {"median_s": statistics.median(xs), "mean_s": statistics.fmean(xs),
            "min_s": min(xs), "max_s": max(xs),
            "std_s": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def speedup(baseline_s: float, parallel_s: float) -> float:
    """How many times faster the parallel run is than the baseline."""
    if parallel_s <= 0:
        raise ValueError(f"parallel_s={parallel_s}; allowed: > 0")
    return baseline_s / parallel_s


# --------------------------------------------------------------------------- work and bytes


def macs_per_device(plan, devices: int) -> list[int]:
    """MACs of one forward of the stage each of ``devices`` pipeline devices runs."""
    return [int(plan.stages[stage_of_device(d, plan.n)].macs) for d in range(devices)]


def bytes_sent(rows: Iterable[Mapping]) -> dict[int, int]:
    """Bytes each rank sent, from per-round timeline rows (``rank``, ``bytes_sent``)."""
    out: dict[int, int] = {}
    for r in rows:
        out[int(r["rank"])] = out.get(int(r["rank"]), 0) + int(r["bytes_sent"])
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- quality


def _range(ref: torch.Tensor, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    span = float(ref.max() - ref.min())
    return span if span > 0 else 1.0


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ (0 for identical inputs)."""
    den = float(ref.double().norm())
    num = float((x.double() - ref.double()).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None,
         cap: float | None = PSNR_CAP_DB) -> float:
    """Peak signal-to-noise ratio in dB: 10·log10(R² / MSE); capped at ``cap`` (see module)."""
    if x.shape != ref.shape:
        raise ValueError(f"psnr: shapes {tuple(x.shape)} and {tuple(ref.shape)} differ")
    mse = float((x.double() - ref.double()).pow(2).mean())
    value = math.inf if mse == 0 else 10.0 * math.log10(_range(ref, data_range) ** 2 / mse)
    return value if cap is None else min(value, cap)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd ``size`` (float64)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size={size}; allowed: an odd integer >= 1")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return w / w.sum()


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None,
         window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, k1: float = 0.01,
         k2: float = 0.03) -> float:
    """Mean structural similarity over the last two dimensions (see module conventions)."""
    if x.shape != ref.shape:
        raise ValueError(f"ssim: shapes {tuple(x.shape)} and {tuple(ref.shape)} differ")
    if x.dim() < 2:
        raise ValueError(f"ssim: needs at least 2 dimensions, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    size = min(window, h if h % 2 else h - 1, w if w % 2 else w - 1)
    g = gaussian_window(size, sigma * size / window)
    kern = (g[:, None] * g[None, :])[None, None]
    a = x.double().reshape(-1, 1, h, w)
    b = ref.double().reshape(-1, 1, h, w)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kern)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    big = _range(ref, data_range)
    c1, c2 = (k1 * big) ** 2, (k2 * big) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1)
                                                      * (var_a + var_b + c2))
    return float(s.mean())


# --------------------------------------------------------------------------- learned metrics

# metric -> (Python packages that can compute it, weights sub-directory of metrics.weights_dir)
LEARNED: dict[str, tuple[tuple[str, ...], str]] = {
    "lpips": (("lpips", "torchmetrics"), "lpips"),
    "clip_score": (("open_clip", "torchmetrics"), "clip"),
    "fid": (("torchmetrics", "pytorch_fid"), "inception"),
}


def learned_metrics_status(weights_dir: str | Path | None, decoded: bool = False) -> dict[str, str]:
    """Why each learned metric (LPIPS, CLIP score, FID) is or is not computed for this run.

    Nothing is downloaded: a metric runs only when one of its packages is installed and its
    weights are under ``weights_dir/<sub>``. They also need decoded RGB images; a run that
    holds only latents (no VAE) records that as the reason.
    """
    root = Path(weights_dir).expanduser() if weights_dir else None
    out = {}
    for name, (packages, sub) in LEARNED.items():
        have = [p for p in packages if importlib.util.find_spec(p) is not None]
        path = root / sub if root is not None else None
        if not have:
            out[name] = f"skipped: not installed (needs one of {', '.join(packages)})"
        elif path is None or not path.exists():
            out[name] = f"skipped: weights not found at {path}"
        elif not decoded:
            out[name] = "skipped: needs decoded RGB images; this run has latents only (no VAE)"
        else:
            out[name] = f"skipped: not implemented for {have[0]} yet (weights at {path})"
    return out
