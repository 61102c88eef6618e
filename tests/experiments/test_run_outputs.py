"""What a run leaves behind: the run directory, the W&B offline run, the bench files, the
sweep summary, and the latent pictures. In-process runs on the tiny SD3 MMDiT, 4 steps
(the model's capture is cached across these tests: experiments/build.py)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from exp_helpers import FAST, MODEL, compose_cfg

from experiments.bench import bench
from experiments.build import compiled_model, sampling_jobs
from experiments.images import latent_rgb
from experiments.run import run_spawn
from experiments.sweep import TABLE_COLUMNS, SweepSummary, summarize
from experiments.wandb_log import PLAN_COLUMNS, offline_records

PNG = b"\x89PNG\r\n\x1a\n"


def _summary(records) -> dict:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for u in r.summary.update:
                out["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
    return out


@pytest.mark.timeout(300)
def test_run_directory_and_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    cfg = compose_cfg(MODEL, *FAST, "parallel.n=2", "parallel.stride=2", "wandb.mode=offline")
    out = tmp_path / "run"
    metrics = run_spawn(cfg, out)

    # the run directory
    for name in ("config.yaml", "plan.json", "plan.txt", "metrics.json", "timeline.json",
                 "result.pt", "sequential.pt", "images/latents.png", "images/timeline.png"):
        assert (out / name).is_file(), name
    for png in ("latents.png", "timeline.png"):
        assert (out / "images" / png).read_bytes()[:8] == PNG
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["n"] == 2 and metrics["stride"] == 2 and metrics["devices"] == 3
    assert metrics["model"] == "sd3/tiny" and 0 < metrics["psnr_db"] < 100
    assert -1 < metrics["ssim"] < 1 and metrics["bytes_sent_total"] > 0
    assert len(metrics["macs_per_device"]) == 3
    assert metrics["lpips"].startswith("skipped: ")
    rows = json.loads((out / "timeline.json").read_text())
    rounds = 1 + 2  # W=1 warm-up round, then ⌈(4−1)/2⌉ parallel rounds
    assert len(rows) == 3 * rounds and {r["device"] for r in rows} == {0, 1, 2}
    assert "plan for sd3/tiny: N=2" in (out / "plan.txt").read_text()

    # the W&B offline run: exactly one (only this process logs), written where WANDB_DIR says
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # W&B's writer is a separate service process: under load it may still be flushing the
    # transaction log when finish() returns, so read until the records are there (≤ 60 s)
    deadline = time.monotonic() + 60
    while True:
        records = list(offline_records(runs[0]))
        kinds = {r.WhichOneof("record_type") for r in records}
        if {"run", "history", "summary", "files"} <= kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"run", "history", "summary", "files"} <= kinds
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["parallel"]["n"] == 2 and config["model"]["name"] == "sd3"
    assert config["wandb"]["mode"] == "offline"
    summary = _summary(records)
    for key in ("speedup", "psnr_db", "ssim", "latency_s", "sequential_s", "bytes_sent_total"):
        assert summary[key] == pytest.approx(metrics[key]), key
    assert summary["plan/n"] == 2
    history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    per_round = [h for h in history if "device0/compute_ms" in h]
    assert [h["_step"] for h in per_round] == list(range(rounds))
    assert all(f"device{d}/round_ms" in h for h in per_round for d in range(3))
    files = runs[0] / "files" / "media"
    plan_table = json.loads(next((files / "table").glob("plan_*.table.json")).read_text())
    assert plan_table["columns"] == PLAN_COLUMNS and len(plan_table["data"]) == 2
    assert next((files / "table").glob("timeline_*.table.json"))
    assert {p.name.split("_")[0] for p in (files / "images").glob("*.png")} == {"latents",
                                                                               "timeline"}


@pytest.mark.timeout(300)
def test_guidance_splits_the_batch_and_full_warmup_is_sequential(tmp_path):
    cfg = compose_cfg(MODEL, *FAST, "scheduler=dpmsolver++", "scheduler.steps=4",
                      "scheduler.guidance=3.0", "parallel.n=2", "parallel.warmup=4",
                      "save_images=false")
    bundle, _ = compiled_model(cfg)
    example = bundle.inputs(cfg.seed)
    (job,) = sampling_jobs(bundle, cfg, 1)
    assert job.guidance == 3.0 and job.x_T.shape[0] == example[bundle.latent].shape[0] // 2
    for name, value in example.items():
        if name in job.cond:
            assert torch.equal(job.uncond[name], value[: len(value) // 2])
            assert torch.equal(job.cond[name], value[len(value) // 2:])
    # W = T: every step sequential, so the pipeline's result is the sequential sampler's
    metrics = run_spawn(cfg, tmp_path)
    got = torch.load(tmp_path / "result.pt")[0]
    assert got.shape == job.x_T.shape
    assert torch.equal(got, torch.load(tmp_path / "sequential.pt"))
    assert metrics["psnr_db"] == 100.0 and metrics["max_abs_diff"] == 0.0
    assert metrics["guidance"] == 3.0 and metrics["scheduler"] == "dpmsolver++"


@pytest.mark.timeout(300)
def test_bench_writes_csv_and_json(tmp_path):
    cfg = compose_cfg(MODEL, *FAST, "parallel.n=2", "bench.repeats=1", "bench.warmup_runs=0")
    report = bench(cfg, tmp_path)
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["threads"]) for r in rows] == [("sequential", "1"), ("sequential", "2"),
                                                        ("asyncdiff", "1")]
    assert all(float(r["latency_s"]) > 0 for r in rows)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert set(data["summary"]) == {"sequential_1", "sequential_2", "asyncdiff"}
    assert data["speedup_vs_1_thread"] == pytest.approx(
        data["summary"]["sequential_1"]["median_s"] / data["summary"]["asyncdiff"]["median_s"])
    assert data["predicted"]["speedup"] > 0 and report["plan_hash"] == data["plan_hash"]
    assert (tmp_path / "plan.json").is_file()


def _fake_job(root: Path, job: int, n: int, stride: int, warmup: int, speedup: float) -> None:
    d = root / str(job)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- parallel.n={n}\n- parallel.stride={stride}\n")
    (d / "metrics.json").write_text(json.dumps({
        "model": "m", "n": n, "stride": stride, "warmup": warmup, "latency_s": 1 / speedup,
        "sequential_s": 1.0, "speedup": speedup, "psnr_db": 30.0 + job, "ssim": 0.9}))
    rows = [{"rank": dev, "replica": 0, "device": dev, "round": r, "stage": min(dev, n - 1),
             "start_s": r * 0.01, "computed_s": r * 0.01 + 0.005, "done_s": r * 0.01 + 0.008,
             "compute_ms": 5.0, "round_ms": 8.0, "bytes_sent": 10}
            for dev in range(n - 1 + stride) for r in range(3)]
    (d / "timeline.json").write_text(json.dumps(rows))


def test_sweep_summary_table_and_plots(tmp_path, capsys):
    for job, (n, s, w, sp) in enumerate([(3, 1, 1, 1.5), (2, 2, 1, 1.2), (2, 1, 1, 1.1),
                                         (3, 2, 1, 1.8)]):
        _fake_job(tmp_path, job, n, s, w, sp)
    files = summarize(tmp_path)
    for name in ("results.csv", "results.json", "speedup_vs_psnr.png", "latency_vs_n.png",
                 "timeline.png"):
        assert (tmp_path / name).is_file(), name
    assert set(files) == {"results_csv", "results_json", "speedup_vs_psnr", "latency_vs_n",
                          "timeline"}
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[: len(TABLE_COLUMNS)] == TABLE_COLUMNS
    assert [(r["n"], r["stride"]) for r in table] == [("2", "1"), ("2", "2"), ("3", "1"),
                                                       ("3", "2")]
    assert table[0]["overrides"] == "parallel.n=2 parallel.stride=1"
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4
    assert "| job |" in capsys.readouterr().out.replace("   ", " ").replace("  ", " ")
    assert summarize(tmp_path / "empty") == {}


def test_sweep_summary_leaves_out_a_job_that_failed(tmp_path):
    from experiments.common import FAILED
    from experiments.sweep import collect

    for job, (n, sp) in enumerate([(2, 1.1), (3, 1.8)]):
        _fake_job(tmp_path, job, n, 1, 1, sp)
    (tmp_path / "1" / FAILED).write_text("RuntimeError: the W&B run could not be written\n")
    assert [r["job"] for r in collect(tmp_path)] == ["0"]


def _read_offline(run_dir: Path, kinds_wanted: set[str]) -> list:
    """The records of an offline W&B run; W&B's writer is a separate service process that
    may still be flushing when finish() returns, so read until ``kinds_wanted`` are there."""
    deadline = time.monotonic() + 60
    while True:
        records = list(offline_records(run_dir))
        if kinds_wanted <= {r.WhichOneof("record_type") for r in records} \
                or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


@pytest.mark.timeout(120)
def test_sweep_callback_logs_to_wandb_offline_and_not_when_disabled(tmp_path, monkeypatch):
    """What Hydra hands the callback at the end of ``-m``: the composed config (its
    ``wandb.mode`` an enum of the schema), and the sweep directory its jobs wrote."""
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the sweep directory holds the W&B run
    for mode in ("offline", "disabled"):
        sweep = tmp_path / mode
        for job, (n, s, sp) in enumerate([(2, 1, 1.1), (3, 2, 1.8)]):
            _fake_job(sweep, job, n, s, 1, sp)
        cfg = compose_cfg(f"wandb.mode={mode}", f"hydra.sweep.dir={sweep}", hydra_node=True)
        SweepSummary().on_multirun_end(cfg)
        assert (sweep / "results.csv").is_file()
        runs = list((sweep / "wandb").glob("offline-run-*"))
        if mode == "disabled":
            assert not (sweep / "wandb").exists()
            continue
        assert len(runs) == 1
        records = _read_offline(runs[0], {"run", "history", "files"})
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.job_type == "sweep" and run.run_group == sweep.name
        assert {u.key: json.loads(u.value_json) for u in run.config.update}["sweep_dir"] \
            == str(sweep)
        logged = {i.nested_key[0] if i.nested_key else i.key for r in records   # media:
                  if r.WhichOneof("record_type") == "history" for i in r.history.item}  # key/…
        assert {"results", "speedup_vs_psnr", "latency_vs_n", "timeline"} <= logged
        table = json.loads(next((runs[0] / "files" / "media" / "table")
                                .glob("results_*.table.json")).read_text())
        speedups = [row[table["columns"].index("speedup")] for row in table["data"]]
        assert sorted(speedups) == [1.1, 1.8]


@pytest.mark.parametrize("shape,want", [
    ((2, 4, 16, 16), (16, 16, 3)),       # UNet latent [B, C, H, W]
    ((2, 4, 2, 8, 8), (8, 8, 3)),        # video [B, C, F, H, W]: leading dims flattened
    ((1, 64, 16), (8, 8, 3)),            # Flux tokens [B, L, D], L = 8·8 patches
    ((1, 10, 6), (10, 6, 3)),            # a non-square sequence: grey L × D
    ((2, 2, 5, 5), (5, 5, 3)),           # two channels: the second repeats
])
def test_latent_rgb_shapes(shape, want):
    x = torch.randn(shape)
    img = latent_rgb(x)
    assert tuple(img.shape) == want
    if len(shape) == 4 and shape[1] >= 3:
        assert torch.equal(img[..., 0], x[0, 0])
