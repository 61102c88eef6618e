"""asyncdiff-run under torchrun and self-spawning: both equal the emulator bit for bit, and
only one process (rank 0 / the parent) writes the metrics and the W&B run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.emulate import Emulator
from asyncdiff.timeline import build_timeline
from experiments.build import compiled_model
from experiments.common import CONF_DIR, plain
from experiments.run import run_spawn, sampling_jobs
from schedulers import make_scheduler, sample

# the tiny SD3 MMDiT: captured 3× faster than the tiny UNet, by each of the torchrun ranks
OVERRIDES = ["model=sd3", "parallel.n=2", "parallel.stride=2", "scheduler.steps=4",
             "partition.cost_model=flops", "partition.repeats=0", "progress=false",
             "wandb.mode=disabled", "save_images=false"]


def emulated(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    torch.set_num_threads(1)
    # the cached capture (experiments/build.py): run_spawn below reuses it
    bundle, c = compiled_model(cfg)
    par = plain(cfg.parallel)
    job = sampling_jobs(bundle, cfg, 1)[0]
    sched = make_scheduler(job.scheduler)
    sched.set_timesteps(job.steps)
    tl = build_timeline(par["n"], par["stride"], par["warmup"], job.steps)
    emu = Emulator(c.staged, c.plan, tl, sched.timesteps)
    return cfg, sample(PipelineDenoiser(emu), make_scheduler(job.scheduler), job.x_T, job.cond,
                       steps=job.steps)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_equals_emulator(tmp_path):
    _, want = emulated(OVERRIDES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_DIR": str(tmp_path / "wb")}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3",
           "--standalone", "-m", "experiments.run", *OVERRIDES,
           "wandb.mode=offline", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out / "result_replica0.pt")
    assert torch.equal(got, want)
    # rank 0 alone ran the baseline and logged: one metrics file, one W&B run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["devices"] == 3 and metrics["world"] == 3
    assert len(json.loads((out / "timeline.json").read_text())) == 3 * 3  # 3 ranks × 3 rounds
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 1
    # the time limits are said once, by rank 0, not by every rank
    assert (proc.stdout + proc.stderr).count("s per wait") == 1, proc.stdout[-3000:]


@pytest.mark.timeout(300)
def test_self_spawning_run_equals_emulator(tmp_path):
    cfg, want = emulated(OVERRIDES)
    run_spawn(cfg, tmp_path)
    got = torch.load(tmp_path / "result.pt")[0]
    assert torch.equal(got, want)
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "plan.json").exists()
