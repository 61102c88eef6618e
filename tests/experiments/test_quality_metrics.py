"""experiments/metrics.py: analytic answers."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from experiments import metrics as M
from experiments import quality as Q


def ramp(shape=(2, 3, 16, 16)) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) / 100.0


def test_speedup_and_latency_summary():
    assert M.speedup(2.0, 0.5) == 4.0
    with pytest.raises(ValueError, match="parallel_s"):
        M.speedup(1.0, 0.0)
    s = M.latency_summary([3.0, 1.0, 2.0])
    assert (s["median_s"], s["mean_s"], s["min_s"], s["max_s"], s["n"]) == (2.0, 2.0, 1.0, 3.0, 3)
    assert s["std_s"] == pytest.approx(1.0)
    assert M.latency_summary([5.0])["std_s"] == 0.0


def test_psnr_analytic():
    ref = ramp()
    span = float(ref.max() - ref.min())
    # torchmetrics turns the data range and 10/ln(10) into float32 tensors
    # (torchmetrics.functional.image.psnr: tensor(float(data_range))): ~1e-7 relative, a few
    # micro-dB; the squared error itself is summed in float64
    for d in (0.5, 0.01, 1e-3):
        # a constant offset d: MSE = d², PSNR = 20·log10(R/d)
        assert Q.psnr(ref + d, ref) == pytest.approx(20 * math.log10(span / d), rel=1e-6)
    assert Q.psnr(ref + 0.1, ref, data_range=1.0) == pytest.approx(20.0, rel=1e-6)
    # identical: +inf, reported as the documented cap
    assert Q.psnr(ref, ref) == Q.PSNR_CAP == 100.0
    assert Q.psnr(ref, ref, cap=None) == math.inf
    with pytest.raises(ValueError, match="shapes"):
        Q.psnr(ref, ref[:1])


def test_relative_l2():
    ref = ramp()
    assert Q.relative_l2(ref, ref) == 0.0
    assert Q.relative_l2(1.5 * ref, ref) == pytest.approx(0.5)
    assert Q.relative_l2(torch.zeros(3), torch.zeros(3)) == 0.0


def test_ssim_identical_is_one():
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert Q.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # small inputs (8×8 video latents) use a smaller window and still give 1
    assert Q.ssim(x[..., :8, :8], x[..., :8, :8]) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_images_analytic():
    # x ≡ a, y ≡ b: σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1), C1 = (K1·L)²
    a, b, big = 0.3, 0.7, 1.0
    x, y = torch.full((1, 16, 16), a), torch.full((1, 16, 16), b)
    c1 = (0.01 * big) ** 2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    assert Q.ssim(x, y, data_range=big) == pytest.approx(want, rel=1e-6)


def test_ssim_symmetric_and_drops_with_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=g)
    y = x + 0.3 * torch.randn(1, 3, 32, 32, generator=g)
    z = x + 1.0 * torch.randn(1, 3, 32, 32, generator=g)
    assert Q.ssim(x, y, data_range=4.0) == pytest.approx(Q.ssim(y, x, data_range=4.0), rel=1e-12)
    assert 1.0 > Q.ssim(y, x) > Q.ssim(z, x) > -1.0


def test_macs_and_bytes():
    plan = SimpleNamespace(n=3, stages=[SimpleNamespace(macs=10), SimpleNamespace(macs=20),
                                        SimpleNamespace(macs=30)])
    # N−1+S = 4 devices with S = 2: the last stage runs on devices 2 and 3
    assert M.macs_per_device(plan, 4) == [10, 20, 30, 30]
    assert M.macs_per_device(plan, 3) == [10, 20, 30]
    rows = [{"rank": 1, "bytes_sent": 5}, {"rank": 0, "bytes_sent": 2},
            {"rank": 1, "bytes_sent": 7}]
    assert M.bytes_sent(rows) == {0: 2, 1: 12}


def test_learned_metrics_say_why_they_are_skipped(tmp_path):
    from experiments import learned
    latents_only = learned.learned_metrics(None, None, tmp_path)
    assert set(latents_only) == {"lpips", "clip_score", "fid"}
    assert all(v == "skipped: needs decoded RGB images; this run has latents only (no VAE)"
               for v in latents_only.values())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    got = learned.learned_metrics(x, x.flip(0), tmp_path / "nowhere", prompts=["a", "b"])
    assert got["clip_score"] == f"skipped: no CLIP model at {tmp_path / 'nowhere' / 'clip'}"
    assert got["fid"] == ("skipped: FID Inception weights not found at "
                          f"{tmp_path / 'nowhere' / 'inception' / learned.INCEPTION_FILE}")
    # LPIPS needs torchvision and its backbone: their value where they are, else the reason
    assert got["lpips"] == _lpips_expected(x, x.flip(0))


def _lpips_expected(x, y):
    """What ``learned.lpips`` must give: the value, computed here the same way, where the
    network can be built (torchvision and its weights), else the reason it cannot."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except Exception as err:  # noqa: BLE001 - the same failure learned.lpips must report
        return "skipped: " + f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return float(metric(((x + 1) / 2).clamp(0, 1), ((y + 1) / 2).clamp(0, 1)))
