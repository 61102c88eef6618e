"""asyncdiff-run: the sequential baseline and the asynchronous pipeline on the same seed.

    asyncdiff-run model=sd15 parallel.n=2                          # spawns the workers itself
    asyncdiff-run -m parallel.n=2,3 parallel.stride=1,2            # sweep: results table + plots
    asyncdiff-run -m +experiment=stride_warmup                     # a study from conf/experiment/
    torchrun --nproc-per-node=3 -m experiments.run parallel.n=2 parallel.stride=2
    torchrun --nnodes=2 --node-rank=0 --master-addr=host … -m experiments.run …

The whole command line is checked first (``experiments/cli.py``): bad input is one line on
stderr, exit code 2, and no output directory. Under torchrun every rank composes the same
config and builds and captures the model; rank 0 plans (measured costs are taken once) and
sends the plan to the others, which rebuild only their own stage from it (the capture's
graph hash must match the plan's). The output directory is described in
``experiments/record.py``; only the parent (self-spawning) or rank 0 (torchrun) writes
metrics, images and the W&B run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from asyncdiff.distributed.launch import launch
from asyncdiff.distributed.sharing import on_every_rank, own_stage, plan_from_rank0
from asyncdiff.distributed import limits, liveness
from asyncdiff.distributed.executor import RoundStats
from asyncdiff.distributed.worker import (WorkerJob, fault_from_env, init_group, inject,
                                          placement, run_job)
from asyncdiff.timeline import stage_of_device
from experiments import atomic
from experiments.build import (compiled_model, job_labels, model_config, workers,
                               sampling_jobs, sequential_sample)
from experiments.cli import checked
from experiments.common import (CONF_DIR, exit_on_bad_input, partition_request, plain,
                                requested, schedule_of)
from experiments.images import save_image_grid, save_latent_comparison
from experiments.reference.model import (classify, is_reference, reference_classifier,
                                         reference_tokens)
from experiments.plots import device_timeline
from experiments.record import (identity, log_run, run_metrics, save_plans, timeline_rows,
                                write_json)
from experiments.checks import resolved
from partition import Plan, capture_or_fallback, compile_model
from experiments import zoo
from partition.capture import capture

__all__ = ["main", "run_spawn", "run_torchrun", "sampling_jobs"]

log = logging.getLogger(__name__)


def save_plan(cfg: DictConfig, out: Path, plan: Plan) -> None:
    """The resolved config and the plan (JSON and its table) go first into the run dir."""
    table = save_plans(cfg, out, [plan], schedule_of(plain(cfg.parallel)), cfg.scheduler.steps)
    if cfg.print_report:
        log.info("plan:\n%s", table)


def finish(cfg: DictConfig, out: Path, plan: Plan, sch, latents: list[torch.Tensor],
           ref: torch.Tensor, t_seq: float, wall: float, rows: list[dict],
           peak_rss: dict[int, int] | None) -> dict:
    """Metrics, latents, timeline, images and the W&B run of a finished run (one process)."""
    resolved = plain(cfg)
    metrics = {**identity(resolved),
               **run_metrics(plan=plan, schedule=sch, steps=cfg.scheduler.steps, latency_s=wall,
                             sequential_s=t_seq, out=latents[0], ref=ref, rows=rows,
                             peak_rss=peak_rss, weights_dir=cfg.metrics.weights_dir)}
    atomic.save_torch(latents, out / "result.pt")
    atomic.save_torch(ref, out / "sequential.pt")
    write_json(out / "timeline.json", rows)
    write_json(out / "metrics.json", metrics)
    label = (f"{metrics['model']} {sch.describe()}, "
             f"{cfg.scheduler.steps} {cfg.scheduler.name} steps")
    images = {}
    model_cfg = plain(cfg.model)
    if is_reference(model_cfg):  # the latent is the image: how many does the classifier know?
        labels = job_labels(cfg, 0, ref.shape[0], reference_tokens(model_cfg).null_class)
        classifier = reference_classifier(model_cfg)
        metrics["recognised_sequential"] = float((classify(classifier, ref) == labels)
                                                 .float().mean())
        metrics["recognised_asyncdiff"] = float((classify(classifier, latents[0]) == labels)
                                                .float().mean())
        log.info("recognised by the classifier: sequential %.0f%%, asyncdiff %.0f%% of %d",
                 100 * metrics["recognised_sequential"], 100 * metrics["recognised_asyncdiff"],
                 len(labels))
        write_json(out / "metrics.json", metrics)
    if cfg.save_images and is_reference(model_cfg):
        images["samples"] = save_image_grid({"sequential": ref, "asyncdiff": latents[0]},
                                            out / "images" / "samples.png",
                                            title=f"{label}, seed {cfg.seed}",
                                            captions=[str(int(v)) for v in labels])
    elif cfg.save_images:
        images["latents"] = save_latent_comparison(ref, latents[0], out / "images" / "latents.png",
                                                   title=f"{label}, seed {cfg.seed}")
        images["timeline"] = device_timeline(rows, out / "images" / "timeline.png", title=label)
    log.info("%s: asyncdiff %.3f s, sequential %.3f s, speedup %.2fx (predicted %.2fx); "
             "PSNR %.1f dB, SSIM %.4f vs sequential; %s", label, wall, t_seq,
             metrics["speedup"], metrics["predicted_speedup"], metrics["psnr_db"],
             metrics["ssim"], out)
    log_run(resolved, out, f"{cfg.model.name}-N{sch.n}S{sch.stride}W{sch.warmup}", [plan],
            metrics, images, rows)
    return metrics


def run_spawn(cfg: DictConfig, out: Path) -> dict:
    """One command, P = R·(N−1+S) worker processes spawned here; this process logs."""
    bundle, compiled = compiled_model(cfg)
    sch = schedule_of(plain(cfg.parallel))
    run = workers(plain(cfg.parallel), sch, compiled.plan, cfg.scheduler.steps)
    save_plan(cfg, out, compiled.plan)
    jobs = sampling_jobs(bundle, cfg, sch.replicas)
    log.info("sampling 1/2: asyncdiff, %d pipeline(s) × %d workers × %d thread(s), %d %s "
             "steps", sch.replicas * sch.groups, sch.devices, run.threads,
             cfg.scheduler.steps, cfg.scheduler.name)
    result = launch(compiled.staged, compiled.plan, sch, jobs, threads=run.threads,
                    backend=run.backend, limits=run.limits, progress=bool(cfg.progress))
    log.info("sampling 2/2: the sequential sampler (the baseline), same seed, %d thread(s)",
             run.threads)
    ref, t_seq = sequential_sample(compiled.staged, jobs[0], run.threads, cfg.progress,
                                   sch.cfg_parallel)
    rows = timeline_rows(result.stats, sch.devices, sch.groups)
    return finish(cfg, out, compiled.plan, sch, result.latents, ref, t_seq, result.wall_s, rows,
                  result.peak_rss)


def run_torchrun(cfg: DictConfig, out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    sch = schedule_of(plain(cfg.parallel))
    par = workers(plain(cfg.parallel), sch)
    part = plain(cfg.partition)
    # before the first step every collective is preceded by a meeting of the ranks that
    # names one that stopped answering (asyncdiff/distributed/liveness.py); the loop's waits
    # are bounded by the step limit, known once the plan is
    startup = plain(cfg.parallel).get("startup_timeout_s") or limits.STARTUP_S
    init_group(rank, world, par.backend, None, startup)  # and this rank's liveness
    fault = fault_from_env()
    inject(fault, rank, "build")
    bundle = zoo.build(model_config(cfg), seed=cfg.seed)
    inputs = bundle.inputs(cfg.seed)
    backend = part.get("backend", "auto")
    captured, fallback = on_every_rank(lambda: capture_or_fallback(
        lambda: capture(bundle.module, bundle.specs, inputs, bundle.contract), backend),
        "capture")
    compiled = None

    def make_plan():
        nonlocal compiled
        with requested():
            compiled = compile_model(
                bundle.module, bundle.specs, inputs, partition_request(part, sch.n),
                strategy=part["strategy"], cost_model=part["cost_model"], captured=captured,
                name=f"{bundle.name}/{bundle.variant}", config_hash=bundle.architecture,
                repeats=part["repeats"], threads=part["threads"], contract=bundle.contract,
                verify=bool(part.get("verify", True)),
                backend="module" if captured is None else "graph", note=fallback)
        save_plan(cfg, out, compiled.plan)
        return compiled.plan

    plan = plan_from_rank0(make_plan)  # rank 0 plans (measured costs are taken once)
    par = workers(plain(cfg.parallel), sch, plan, cfg.scheduler.steps, quiet=rank != 0)
    device = sch.place(rank)[2]
    own = on_every_rank(lambda: own_stage(plan, captured, bundle.module, bundle.specs, inputs,
                                          bundle.contract, stage_of_device(device, plan.n),
                                          part["threads"]), "building this rank's stage")
    jobs = sampling_jobs(bundle, cfg, sch.replicas)
    job = WorkerJob(plan=plan, segments=own.parts, hoist_inputs=own.hoist_inputs,
                    specs=bundle.specs,
                    placeholders=captured.placeholders if captured is not None else
                    {s.name: s.name for s in bundle.specs},
                    output=plan.output, schedule=sch, sampling=jobs, threads=par.threads,
                    backend=par.backend, limits=par.limits, progress=bool(cfg.progress),
                    fault=fault)
    bundle = captured = None  # keep only this rank's stage (rank 0: and the plan's)
    liveness.arrive("sampling")
    t0 = time.perf_counter()
    latent, stats = run_job(job, rank, world)
    wall = time.perf_counter() - t0
    replica, group, device = sch.place(rank)
    if group == 0 and device == 0:  # the first rank of each replica
        atomic.save_torch(latent, out / f"result_replica{replica}.pt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = {"stats": [dataclasses.asdict(s) for s in stats], "peak": peak,
            "placement": placement(par.backend, rank)}
    gathered = [json.loads(g) for g in liveness.exchange("the end", json.dumps(mine))]
    liveness.stop()
    dist.destroy_process_group()
    if rank == 0:  # the others are done; rank 0 runs the baseline and writes the results
        ref, t_seq = sequential_sample(compiled.staged, jobs[0], par.threads, cfg.progress,
                                       sch.cfg_parallel)
        rows = timeline_rows({r: [RoundStats(**s) for s in g["stats"]]
                              for r, g in enumerate(gathered)}, sch.devices, sch.groups,
                             {r: g["placement"] for r, g in enumerate(gathered)})
        finish(cfg, out, plan, sch, [latent], ref, t_seq, wall, rows,
               {r: g["peak"] for r, g in enumerate(gathered)})


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@exit_on_bad_input
def hydra_main(cfg: DictConfig) -> None:
    cfg = resolved(cfg, "run")  # again: also when called without the command-line check
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("pipeline") is not None:  # a real diffusers pipeline: experiments/pipeline_run.py
        from experiments import pipeline_run
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        (pipeline_run.run_pipeline_torchrun if torchrun else pipeline_run.run_pipeline_spawn)(
            cfg, out)
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        run_torchrun(cfg, out)
    else:
        run_spawn(cfg, out)


main = checked(hydra_main)  # the console script is experiments.cli.run_main

if __name__ == "__main__":
    main()
