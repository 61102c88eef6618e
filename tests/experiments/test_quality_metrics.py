"""experiments/metrics.py: analytic answers."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from experiments import metrics as M


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
    for d in (0.5, 0.01, 1e-3):
        # a constant offset d: MSE = d², PSNR = 20·log10(R/d)
        assert M.psnr(ref + d, ref) == pytest.approx(20 * math.log10(span / d), rel=1e-9)
    assert M.psnr(ref + 0.1, ref, data_range=1.0) == pytest.approx(20.0, rel=1e-9)
    # identical: +inf, reported as the documented cap
    assert M.psnr(ref, ref) == M.PSNR_CAP_DB == 100.0
    assert M.psnr(ref, ref, cap=None) == math.inf
    with pytest.raises(ValueError, match="shapes"):
        M.psnr(ref, ref[:1])


def test_relative_l2():
    ref = ramp()
    assert M.relative_l2(ref, ref) == 0.0
    assert M.relative_l2(1.5 * ref, ref) == pytest.approx(0.5)
    assert M.relative_l2(torch.zeros(3), torch.zeros(3)) == 0.0


def test_gaussian_window():
    w = M.gaussian_window(11, 1.5)
    assert w.sum().item() == pytest.approx(1.0)
    assert torch.equal(w, w.flip(0)) and w.argmax().item() == 5
    # ratio of neighbours: exp(-(r² - (r-1)²)/(2σ²))
    assert (w[6] / w[5]).item() == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)))
    with pytest.raises(ValueError, match="odd"):
        M.gaussian_window(4)


def test_ssim_identical_is_one():
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert M.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # small inputs (8×8 video latents) use a smaller window and still give 1
    assert M.ssim(x[..., :8, :8], x[..., :8, :8]) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_images_analytic():
    # x ≡ a, y ≡ b: σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1), C1 = (K1·L)²
    a, b, big = 0.3, 0.7, 1.0
    x, y = torch.full((1, 16, 16), a), torch.full((1, 16, 16), b)
    c1 = (0.01 * big) ** 2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    assert M.ssim(x, y, data_range=big) == pytest.approx(want, rel=1e-6)


def test_ssim_symmetric_and_drops_with_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=g)
    y = x + 0.3 * torch.randn(1, 3, 32, 32, generator=g)
    z = x + 1.0 * torch.randn(1, 3, 32, 32, generator=g)
    assert M.ssim(x, y, data_range=4.0) == pytest.approx(M.ssim(y, x, data_range=4.0), rel=1e-12)
    assert 1.0 > M.ssim(y, x) > M.ssim(z, x) > -1.0


def test_macs_and_bytes():
    plan = SimpleNamespace(n=3, stages=[SimpleNamespace(macs=10), SimpleNamespace(macs=20),
                                        SimpleNamespace(macs=30)])
    # N−1+S = 4 devices with S = 2: the last stage runs on devices 2 and 3
    assert M.macs_per_device(plan, 4) == [10, 20, 30, 30]
    assert M.macs_per_device(plan, 3) == [10, 20, 30]
    rows = [{"rank": 1, "bytes_sent": 5}, {"rank": 0, "bytes_sent": 2},
            {"rank": 1, "bytes_sent": 7}]
    assert M.bytes_sent(rows) == {0: 2, 1: 12}


def test_learned_metrics_are_skipped_without_weights(tmp_path, monkeypatch):
    status = M.learned_metrics_status(tmp_path / "nowhere")
    assert set(status) == {"lpips", "clip_score", "fid"}
    for name, why in status.items():
        assert why.startswith("skipped: ")
        # either no package, or the weights path is named
        assert "not installed" in why or str(tmp_path / "nowhere") in why
    # with the packages "installed", the missing weights path is what is reported
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: object())
    status = M.learned_metrics_status(tmp_path / "nowhere")
    assert status["lpips"] == f"skipped: weights not found at {tmp_path / 'nowhere' / 'lpips'}"
    (tmp_path / "w" / "inception").mkdir(parents=True)
    assert "latents only" in M.learned_metrics_status(tmp_path / "w")["fid"]
