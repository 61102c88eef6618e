"""The demo: plan a model, then sample sequentially and asynchronously on the same seed.

    python -m experiments.demo                       # tiny SD-1.5 UNet, N=2, 50 DDIM steps
    python -m experiments.demo parallel.n=3 parallel.stride=2

Prints latency of the sequential sampler on 1 and on `parallel.n` threads against the
asynchronous pipeline (one thread per worker), and how far the result moved (relative L2,
PSNR against the sequential sample; random weights, so this measures drift, not quality).
"""
from __future__ import annotations

import math
import time

import hydra
import torch
from omegaconf import DictConfig

from asyncdiff.denoiser import SequentialDenoiser
from asyncdiff.dist.launch import launch
from asyncdiff.dist.worker import ParallelSpec, SamplingJob
from experiments.common import CONF_DIR, exit_on_bad_input, plain
from experiments.plan import plan_from_config
from partition import zoo
from partition.spec import latent_name
from schedulers import make_scheduler, sample


def sequential_latency(staged, job: SamplingJob, threads: int) -> tuple[torch.Tensor, float]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out = sample(SequentialDenoiser(staged), make_scheduler(job.scheduler), job.x_T, job.cond,
                 steps=job.steps)
    return out, time.perf_counter() - t0


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@exit_on_bad_input
def main(cfg: DictConfig) -> None:
    cfg.print_report = True
    compiled = plan_from_config(cfg, out_dir=None)
    par = plain(cfg.parallel)
    staged, plan = compiled.staged, compiled.plan
    inputs = compiled.graph.captured.specs
    latent = latent_name(inputs)
    shape = next(s.shape for s in inputs if s.name == latent)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
    bundle_inputs = zoo.example_inputs(list(inputs), cfg.seed)
    cond = {s.name: bundle_inputs[s.name] for s in inputs if s.role == "cond"}
    job = SamplingJob(cfg.scheduler.name, cfg.scheduler.steps, x_T, cond)
    spec = ParallelSpec(n=par["n"], stride=par["stride"], warmup=par["warmup"],
                        time_shift=par["time_shift"], stride_noise=par["stride_noise"],
                        threads=par["threads"])
    ref, t1 = sequential_latency(staged, job, 1)
    _, tp = sequential_latency(staged, job, spec.devices)
    result = launch(staged, plan, spec, [job])
    out = result.latents[0]
    rel = ((out - ref).norm() / ref.norm()).item()
    mse = (out - ref).pow(2).mean().item()
    peak = (ref.max() - ref.min()).item()
    psnr = 10 * math.log10(peak ** 2 / mse) if mse > 0 else float("inf")
    print(f"\n{cfg.scheduler.steps} {cfg.scheduler.name} steps, N={spec.n} S={spec.stride} "
          f"W={spec.warmup}, {spec.devices} workers × {spec.threads} thread")
    print(f"sequential, 1 thread:  {t1:.2f} s")
    print(f"sequential, {spec.devices} threads: {tp:.2f} s")
    print(f"asyncdiff:             {result.wall_s:.2f} s   speedup {t1 / result.wall_s:.2f}x vs "
          f"1 thread, {tp / result.wall_s:.2f}x vs {spec.devices} threads")
    print(f"drift from sequential: relative L2 {rel:.4f}, PSNR {psnr:.1f} dB "
          "(random weights: drift, not image quality)")


if __name__ == "__main__":
    main()
