"""The demo: plan a model, then sample sequentially and asynchronously on the same seed.

    python -m experiments.demo                       # trained digits model, 10 images, N=2, 50 DDIM steps
    python -m experiments.demo parallel.n=3 parallel.stride=2
    python -m experiments.demo model=patches         # the natural-image patches model
    python -m experiments.demo model=sd15 batch=null # a tiny random SD-1.5 UNet: drift only

Prints the plan, the latency of the sequential sampler on 1 and on P = N−1+S threads
against the asynchronous pipeline (one thread per worker), and how far the result moved
(relative L2, PSNR, SSIM against the sequential sample of the same seed). On a trained
reference model it also prints how many of each sampler's images the model's classifier
recognises as their class, and writes the two image grids to ``samples.png`` in the run
directory. Timings assume an otherwise idle machine. ``asyncdiff-run`` is the entry point
that records everything (metrics JSON, timeline, W&B).
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from asyncdiff.distributed.launch import launch
from experiments import metrics as M
from experiments import quality as Q
from experiments.build import (compiled_model, job_labels, sampling_jobs, workers,
                               sequential_sample)
from experiments.cli import checked
from experiments.common import (CONF_DIR, exit_on_bad_input, parallel_rounds, plain,
                                schedule_of, sequential_rounds)
from experiments.images import save_image_grid
from experiments.reference.model import (classify, is_reference, reference_classifier,
                                         reference_tokens)
from experiments.checks import resolved
from partition import format_plan


@hydra.main(config_path=CONF_DIR, config_name="demo", version_base="1.3")
@exit_on_bad_input
def hydra_main(cfg: DictConfig) -> None:
    cfg = resolved(cfg, "demo")
    bundle, compiled = compiled_model(cfg)
    spec = schedule_of({**plain(cfg.parallel), "replicas": 1})
    run = workers(plain(cfg.parallel), spec, compiled.plan, cfg.scheduler.steps)
    print(format_plan(compiled.plan, steps=cfg.scheduler.steps,
                      warmup=sequential_rounds(spec, cfg.scheduler.steps),
                      stride=spec.stride, rounds=parallel_rounds(spec, cfg.scheduler.steps)))
    job = sampling_jobs(bundle, cfg, 1)[0]
    ref, t1 = sequential_sample(compiled.staged, job, 1, cfg.progress)
    _, tp = sequential_sample(compiled.staged, job, spec.devices, cfg.progress)
    result = launch(compiled.staged, compiled.plan, spec, [job], threads=run.threads,
                    backend=run.backend, limits=run.limits)
    out = result.latents[0]
    n_img = out.shape[0]
    print(f"\n{bundle.name}: {n_img} image(s), {cfg.scheduler.steps} {cfg.scheduler.name} steps"
          f"{'' if job.guidance is None else f', guidance {job.guidance:g}'}, "
          f"N={spec.n} S={spec.stride} W={spec.warmup}, {spec.devices} workers × "
          f"{run.threads} thread")
    print(f"sequential, 1 thread:  {t1:.2f} s")
    print(f"sequential, {spec.devices} threads: {tp:.2f} s")
    print(f"asyncdiff:             {result.wall_s:.2f} s   speedup "
          f"{M.speedup(t1, result.wall_s):.2f}x vs 1 thread, "
          f"{M.speedup(tp, result.wall_s):.2f}x vs {spec.devices} threads")
    model_cfg = plain(cfg.model)
    trained = is_reference(model_cfg)
    print(f"asyncdiff vs sequential, same seed: relative L2 {Q.relative_l2(out, ref):.4f}, "
          f"PSNR {Q.psnr(out, ref):.1f} dB, SSIM {Q.ssim(out, ref):.4f}"
          + ("" if trained else " (random weights: drift, not image quality)"))
    if trained:
        labels = job_labels(cfg, 0, n_img, reference_tokens(model_cfg).null_class)
        classifier = reference_classifier(model_cfg)
        hits = [int((classify(classifier, x) == labels).sum()) for x in (ref, out)]
        print(f"recognised by the classifier as their class: sequential {hits[0]}/{n_img}, "
              f"asyncdiff {hits[1]}/{n_img}")
        path = save_image_grid({"sequential": ref, "asyncdiff": out},
                               Path(HydraConfig.get().runtime.output_dir) / "samples.png",
                               title=f"{bundle.name}: N={spec.n} S={spec.stride} "
                                     f"W={spec.warmup}, {cfg.scheduler.steps} steps, "
                                     f"seed {cfg.seed}",
                               captions=[str(int(v)) for v in labels])
        print(f"image grids: {path}")


main = checked(hydra_main, "demo")

if __name__ == "__main__":
    main()
