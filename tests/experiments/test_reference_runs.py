"""asyncdiff-run and the demo on the trained digits model: jobs use the model's training
betas and class tokens, the run equals the emulator on them, and the classifier's verdict
and the image grids are recorded."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.emulate import Emulator
from asyncdiff.timeline import build_timeline
from experiments.build import compiled_model, sampling_jobs
from experiments.common import CONF_DIR, plain
from experiments.reference import model as R
from experiments.run import run_spawn
from schedulers import make_scheduler, sample

from exp_helpers import REPO, env

OVERRIDES = ["model=digits", "batch=3", "labels=[7,1,4]", "parallel.n=2", "scheduler.steps=4",
             "partition.cost_model=flops", "partition.repeats=0", "progress=false",
             "wandb.mode=disabled"]


def composed(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.slow
def test_jobs_use_the_training_betas_class_tokens_and_the_models_guidance():
    cfg = composed(OVERRIDES)
    bundle, compiled = compiled_model(cfg)
    job = sampling_jobs(bundle, cfg, 2)
    model_cfg = plain(cfg.model)
    assert job[0].scheduler_kwargs == model_cfg["schedule"]
    assert job[0].guidance == model_cfg["reference"]["guidance"] == 3.0
    tokens = R.reference_tokens(model_cfg)
    # replica r continues the labels: (7, 1, 4), then (7, 1, 4) again (cycled)
    assert torch.equal(job[0].cond["encoder_hidden_states"], tokens(torch.tensor([7, 1, 4])))
    assert torch.equal(job[1].uncond["encoder_hidden_states"], tokens(torch.full((3,), 10)))
    assert job[0].x_T.shape == (3, 1, 16, 16) and not torch.equal(job[0].x_T, job[1].x_T)
    # the plan was captured for the [uncond, cond] batch of 3 images
    spec = next(s for s in compiled.staged.specs if s.role == "latent")
    assert spec.shape == (6, 1, 16, 16)
    # without labels: seed, seed + 1, ... over the run's images
    cfg2 = composed([o for o in OVERRIDES if not o.startswith("labels")] + ["seed=8"])
    jobs2 = sampling_jobs(*[compiled_model(cfg2)[0], cfg2, 2])
    assert torch.equal(jobs2[1].cond["encoder_hidden_states"],
                       tokens(torch.tensor([1, 2, 3])))  # (8 + 3 + i) mod 10


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_on_digits_equals_emulator_and_records_the_classifier(tmp_path):
    torch.set_num_threads(1)
    cfg = composed(OVERRIDES)
    bundle, c = compiled_model(cfg)
    job = sampling_jobs(bundle, cfg, 1)[0]
    sched = make_scheduler(job.scheduler, **job.scheduler_kwargs)
    sched.set_timesteps(job.steps)
    emu = Emulator(c.staged, c.plan, build_timeline(2, 1, 1, job.steps), sched.timesteps)
    want = sample(PipelineDenoiser(emu), make_scheduler(job.scheduler, **job.scheduler_kwargs),
                  job.x_T, job.cond, steps=job.steps, guidance_scale=job.guidance,
                  uncond=job.uncond)
    metrics = run_spawn(cfg, tmp_path)
    assert torch.equal(torch.load(tmp_path / "result.pt")[0], want)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    classifier = R.reference_classifier(plain(cfg.model))
    labels = torch.tensor([7, 1, 4])
    seq = torch.load(tmp_path / "sequential.pt")
    assert on_disk["recognised_asyncdiff"] == metrics["recognised_asyncdiff"] == float(
        (R.classify(classifier, want) == labels).float().mean())
    assert on_disk["recognised_sequential"] == float(
        (R.classify(classifier, seq) == labels).float().mean())
    assert (tmp_path / "images" / "samples.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_runs_on_the_digits_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.demo", "scheduler.steps=10", "batch=4",
         "partition.cost_model=flops", "partition.repeats=0", "progress=false",
         f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env(), capture_output=True, text=True,
        timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "digits: 4 image(s), 10 ddim steps, guidance 3" in out
    assert "recognised by the classifier as their class: sequential" in out
    assert (tmp_path / "samples.png").stat().st_size > 0
