"""experiments/quality.py (analytic answers) and experiments/study.py (a few samples on the
digits model: the table has a row per point, the sequential point and a point that warms up
every step equal the sequential samples exactly)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from experiments import quality as Q


def test_frechet_distance_of_a_set_to_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    assert Q.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    # equal covariances: FD = |Δμ|² exactly
    x = np.random.default_rng(1).normal(size=(400, 8)) @ np.diag(np.arange(1, 9.0))
    shift = np.arange(8.0) / 4
    assert Q.frechet_distance(x + shift, x) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_frechet_distance_of_two_isotropic_gaussians():
    # N(0, a²I) vs N(0, b²I) in d dims: d (a − b)², here from the exact covariances
    d, a, b = 6, 2.0, 0.5
    rng = np.random.default_rng(2)
    z = rng.normal(size=(20000, d))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    assert Q.frechet_distance(a * z, b * z) == pytest.approx(d * (a - b) ** 2, rel=1e-6)


def test_psnr_of_identical_images_is_the_documented_cap():
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert torch.equal(Q.psnr_per_sample(x, x), torch.full((5,), Q.PSNR_CAP, dtype=torch.float64))
    # a constant offset c on data range 2: 10·log10(4 / c²)
    got = Q.psnr_per_sample(x + 0.1, x)
    assert torch.allclose(got, torch.full((5,), 10 * np.log10(4 / 0.01), dtype=torch.float64))
    assert torch.allclose(Q.relative_l2_per_sample(2 * x, x), torch.ones(5, dtype=torch.float64))


def test_bootstrap_interval_covers_a_known_mean_at_its_level():
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(200):
        v = rng.normal(5.0, 2.0, size=100)
        m, lo, hi = Q.bootstrap_ci(v, resamples=500, seed=int(rng.integers(1 << 30)))
        assert lo <= m <= hi
        covered += lo <= 5.0 <= hi
    # nominal 95 %; the percentile bootstrap under-covers slightly at n = 100
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_frechet_difference():
    rng = np.random.default_rng(4)
    real = rng.normal(0, 1, size=(300, 4))
    ref = rng.normal(0, 1, size=(300, 4))
    # a set against itself: exactly 0, in every resample
    assert Q.frechet_delta_ci(ref, ref, real, resamples=50) == (0.0, 0.0, 0.0)
    shifted = ref + 0.5  # FD grows by about |shift|² = 1
    d, lo, hi = Q.frechet_delta_ci(shifted, ref, real, resamples=100)
    assert lo <= d <= hi and 0.7 < d < 1.3 and lo > 0


def test_cosine_per_sample():
    a = torch.randn(3, 2, 4)
    assert torch.allclose(Q.cosine_per_sample(a, 3 * a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(Q.cosine_per_sample(a, -a), -torch.ones(3, dtype=torch.float64))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.slow
def test_study_on_digits_writes_its_table(tmp_path, monkeypatch, device):
    from hydra import compose, initialize_config_dir

    from experiments import study
    from experiments.common import CONF_DIR

    torch.set_num_threads(1)
    points = [["parallel.n=1"], ["parallel.n=2", "parallel.warmup=4"], ["parallel.n=2"],
              ["parallel.n=3", "parallel.stride=2"]]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="study", overrides=[
            "scheduler.steps=4", "study.samples=8", "study.chunk=4", "study.fd_samples=8",
            "study.bootstrap=50", "study.fd_bootstrap=10",
            "study.similarity=2", "study.name=t", f"study.out={tmp_path / 'out'}",
            f"study.cache={tmp_path / 'cache'}", f"study.device={device}"])
    cfg.study.points = points
    monkeypatch.setattr(study, "HydraConfig", type("H", (), {"initialized": staticmethod(lambda: False)}))
    study.hydra_main.__wrapped__(cfg)
    out = tmp_path / "out" / "digits" / "t"
    res = json.loads((out / "results.json").read_text())
    rows = {r["point"]: r for r in res["rows"]}
    assert list(rows) == ["sequential, 4 steps", "N=2 S=1 W=4, 4 steps", "N=2 S=1 W=1, 4 steps",
                          "N=3 S=2 W=1, 4 steps"]
    # warm-up over every step is the sequential sampler: bit-identical samples (the cached
    # tensors themselves); a stale schedule's are not
    cache = tmp_path / "cache" / "digits"

    def samples(name):
        return torch.cat([torch.load(cache / f"{rows[name]['cache_tag']}-{c}.pt")
                          for c in (0, 1)])
    assert torch.equal(samples("N=2 S=1 W=4, 4 steps"), samples("sequential, 4 steps"))
    assert not torch.equal(samples("N=2 S=1 W=1, 4 steps"), samples("sequential, 4 steps"))
    for name in ("sequential, 4 steps", "N=2 S=1 W=4, 4 steps"):
        assert rows[name]["psnr_db"] == [Q.PSNR_CAP] * 3 and rows[name]["psnr_capped_fraction"] == 1
    assert rows["N=2 S=1 W=1, 4 steps"]["psnr_db"][0] < Q.PSNR_CAP
    assert rows["N=3 S=2 W=1, 4 steps"]["devices"] == 4
    assert all(r["samples"] == 8 and 0 <= r["accuracy"][0] <= 1 for r in rows.values())
    assert res["fd_real_floor"] > 0 and res["device"] == device
    assert rows["N=2 S=1 W=4, 4 steps"]["fd_delta"] == [0.0, 0.0, 0.0]
    assert set(res["similarity"]["stages"]) == {"0", "1"}
    assert len(res["similarity"]["stages"]["1"]["cosine"]) == 3
    for f in ("results.csv", "table.md", "quality.png", "similarity.png"):
        assert (out / f).stat().st_size > 0
    assert "| N=2 S=1 W=1, 4 steps | 2 |" in (out / "table.md").read_text()
    # cached: a second run samples nothing and gives the same table
    before = sorted(p.name for p in (tmp_path / "cache" / "digits").iterdir())
    study.hydra_main.__wrapped__(cfg)
    assert sorted(p.name for p in (tmp_path / "cache" / "digits").iterdir()) == before
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]


def test_study_device_must_be_cpu_or_cuda():
    from experiments import study
    with pytest.raises(ValueError, match="study.device='tpu'; allowed: cpu, cuda"):
        study.use_device("tpu")


def test_a_cooldown_or_sync_point_is_its_own_point():
    """A study point with a cool-down or sync steps is described (its cache key, its label)
    and run by them; a point without keeps the key it always had."""
    from exp_helpers import compose_cfg
    from experiments.schema import register
    from experiments.study import describe, label, point_config

    register()
    cfg = compose_cfg("model=digits", "+experiment=quality_table1")
    plain_point = describe(point_config(cfg, ["parallel.n=2", "parallel.warmup=1"]))
    cooled = describe(point_config(cfg, ["parallel.n=2", "parallel.warmup=1",
                                         "parallel.cooldown=2", "parallel.sync=[5]"]))
    assert "cooldown" not in plain_point and "sync" not in plain_point
    assert cooled == {**plain_point, "cooldown": 2, "sync": [5]}
    assert label(cooled) == f"N=2 S=1 W=1, C=2, sync [5], {cooled['steps']} steps"
    assert plain_point["stride_noise"] == "fresh" and "strategy" not in plain_point


@pytest.mark.slow
def test_frontier_study_runs_every_method(tmp_path, monkeypatch):
    """Sequential with fewer steps, CFG-parallel, the hybrid, the step cache and cool-down
    as study points, with the fronts per device count; the exact cases are exact."""
    from hydra import compose, initialize_config_dir

    from experiments import study
    from experiments.common import CONF_DIR

    torch.set_num_threads(1)
    points = [["parallel.n=1"], ["parallel.n=1", "scheduler.steps=2"],
              ["parallel.n=1", "parallel.cfg_parallel=true"],
              ["parallel.n=2", "parallel.warmup=4", "parallel.cfg_parallel=true"],
              ["parallel.n=2", "parallel.cfg_parallel=true"],
              ["parallel.n=2", "parallel.cache_interval=1", "partition.strategy=shell_core"],
              ["parallel.n=2", "parallel.cache_interval=2", "partition.strategy=shell_core"],
              ["parallel.n=2", "parallel.cooldown=1"]]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="study", overrides=[
            "scheduler.steps=4", "study.samples=4", "study.chunk=4", "study.fd_samples=4",
            "study.bootstrap=20", "study.fd_bootstrap=5", "study.name=f",
            f"study.out={tmp_path / 'out'}", f"study.cache={tmp_path / 'cache'}",
            "study.frontier=[1,2,4]"])
    cfg.study.points = points
    monkeypatch.setattr(study, "HydraConfig",
                        type("H", (), {"initialized": staticmethod(lambda: False)}))
    study.hydra_main.__wrapped__(cfg)
    out = tmp_path / "out" / "digits" / "f"
    rows = {r["point"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    cfgp, hyb_w4 = rows["CFG-parallel, 4 steps"], rows["hybrid CFG × N=2 S=1 W=4, 4 steps"]
    # every step sequential: the hybrid is CFG-parallel, the K = 1 cache the sequential sampler
    assert hyb_w4["psnr_db"] == cfgp["psnr_db"] and hyb_w4["fd_delta"] == cfgp["fd_delta"]
    k1 = rows["step cache K=1 (shell_core N=2), 4 steps"]
    assert k1["psnr_db"] == [Q.PSNR_CAP] * 3 and k1["devices"] == 1
    k2 = rows["step cache K=2 (shell_core N=2), 4 steps"]
    assert k2["psnr_db"][0] < Q.PSNR_CAP and k2["devices"] == 1
    assert 1 < k2["predicted_speedup"] < 2 and k1["predicted_speedup"] == pytest.approx(1, 0.05)
    assert [cfgp["devices"], hyb_w4["devices"], rows["N=2 S=1 W=1, C=1, 4 steps"]["devices"]] \
        == [2, 4, 2]
    assert rows["sequential, 2 steps"]["predicted_speedup"] == 2.0
    assert 1 < cfgp["predicted_speedup_comm"] < cfgp["predicted_speedup"] == 2.0
    fronts = json.loads((out / "frontier.json").read_text())["fronts"]
    assert [f["devices"] for f in fronts] == [1, 2, 4]
    assert "hybrid CFG × N=2 S=1 W=1, 4 steps" in fronts[2]["candidates"]
    assert "hybrid CFG × N=2 S=1 W=1, 4 steps" not in fronts[1]["candidates"]
    assert "sequential, 4 steps" in fronts[0]["psnr_front"]  # the exact one: capped PSNR
    text = (out / "frontier.md").read_text()
    assert "### 4 devices" in text and "●" in text
    assert (out / "frontier.png").stat().st_size > 0
