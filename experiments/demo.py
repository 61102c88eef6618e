"""The demo: plan a model, then sample sequentially and asynchronously on the same seed.

    python -m experiments.demo                       # tiny SD-1.5 UNet, N=2, 50 DDIM steps
    python -m experiments.demo parallel.n=3 parallel.stride=2

Prints the plan, the latency of the sequential sampler on 1 and on P = N−1+S threads
against the asynchronous pipeline (one thread per worker), and how far the result moved
(relative L2, PSNR, SSIM against the sequential sample; random weights, so this measures
drift, not quality). Writes nothing; ``asyncdiff-run`` is the entry point that records.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from asyncdiff.dist.launch import launch
from experiments import metrics as M
from experiments.build import compiled_model, parallel_spec, sampling_jobs, sequential_sample
from experiments.cli import checked
from experiments.common import CONF_DIR, exit_on_bad_input, plain
from experiments.validate import validate_config
from partition import format_plan


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@exit_on_bad_input
def hydra_main(cfg: DictConfig) -> None:
    validate_config(plain(cfg), entry="demo")
    spec = parallel_spec({**plain(cfg.parallel), "replicas": 1})
    bundle, compiled = compiled_model(cfg)
    print(format_plan(compiled.plan, steps=cfg.scheduler.steps, warmup=spec.warmup,
                      stride=spec.stride))
    job = sampling_jobs(bundle, cfg, 1)[0]
    ref, t1 = sequential_sample(compiled.staged, job, 1, cfg.progress)
    _, tp = sequential_sample(compiled.staged, job, spec.devices, cfg.progress)
    result = launch(compiled.staged, compiled.plan, spec, [job])
    out = result.latents[0]
    print(f"\n{cfg.scheduler.steps} {cfg.scheduler.name} steps, N={spec.n} S={spec.stride} "
          f"W={spec.warmup}, {spec.devices} workers × {spec.threads} thread")
    print(f"sequential, 1 thread:  {t1:.2f} s")
    print(f"sequential, {spec.devices} threads: {tp:.2f} s")
    print(f"asyncdiff:             {result.wall_s:.2f} s   speedup "
          f"{M.speedup(t1, result.wall_s):.2f}x vs 1 thread, "
          f"{M.speedup(tp, result.wall_s):.2f}x vs {spec.devices} threads")
    print(f"drift from sequential: relative L2 {M.relative_l2(out, ref):.4f}, "
          f"PSNR {M.psnr(out, ref):.1f} dB, SSIM {M.ssim(out, ref):.4f} "
          "(random weights: drift, not image quality)")


main = checked(hydra_main, "demo")

if __name__ == "__main__":
    main()
