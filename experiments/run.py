"""asyncdiff-run: the sequential baseline and the asynchronous pipeline on the same seed.

    asyncdiff-run model=sd15 parallel.n=2                          # spawns the workers itself
    torchrun --nproc-per-node=3 -m experiments.run parallel.n=2 parallel.stride=2
    torchrun --nnodes=2 --node-rank=0 --master-addr=host … -m experiments.run …

Under torchrun every rank composes the same config and builds and captures the model;
rank 0 plans (measured costs are taken once) and sends the plan to the others, which
rebuild only their own stage from it (the capture's graph hash must match the plan's).
Writes ``result.pt`` (final latents) and ``metrics.json`` into the run directory.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from asyncdiff.denoiser import SequentialDenoiser
from asyncdiff.dist.executor import stage_of_device
from asyncdiff.dist.launch import launch
from asyncdiff.dist.worker import ParallelSpec, SamplingJob, WorkerJob, init_group, run_job
from experiments.common import CONF_DIR, exit_on_bad_input, partition_request, plain
from partition import Plan, compile_model, stages_from_plan, zoo
from partition.capture import capture
from partition.cost import NodeCosts
from partition.graph import build_graph
from schedulers import make_scheduler, sample


def parallel_spec(par: dict) -> ParallelSpec:
    backend = par["backend"]
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    return ParallelSpec(n=par["n"], stride=par["stride"], warmup=par["warmup"],
                        time_shift=par["time_shift"], stride_noise=par["stride_noise"],
                        threads=par["threads"], backend=backend, replicas=par["replicas"])


def sampling_jobs(bundle, cfg: DictConfig, replicas: int) -> list[SamplingJob]:
    """One job per replica: replica r uses seed + r for its noise and conditioning."""
    jobs = []
    latent = bundle.latent
    for r in range(replicas):
        example = bundle.inputs(cfg.seed + r)
        cond = {s.name: example[s.name] for s in bundle.specs if s.role == "cond"}
        x_T = torch.randn(example[latent].shape,
                          generator=torch.Generator().manual_seed(cfg.seed + r))
        jobs.append(SamplingJob(cfg.scheduler.name, cfg.scheduler.steps, x_T, cond))
    return jobs


def run_torchrun(cfg: DictConfig, out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    par = parallel_spec(plain(cfg.parallel))
    init_group(rank, world, par.backend, None, par.timeout_s * 4)
    bundle = zoo.build(plain(cfg.model), seed=cfg.seed)
    inputs = bundle.inputs(cfg.seed)
    captured = capture(bundle.module, bundle.specs, inputs)
    shared = [None]
    if rank == 0:
        part = plain(cfg.partition)
        compiled = compile_model(bundle.module, bundle.specs, inputs,
                                 partition_request(part, par.n), strategy=part["strategy"],
                                 cost_model=part["cost_model"], captured=captured,
                                 name=f"{bundle.name}/{bundle.variant}",
                                 config_hash=bundle.config_hash, repeats=part["repeats"],
                                 threads=part["threads"])
        shared = [compiled.plan.to_json()]
    dist.broadcast_object_list(shared, src=0)
    plan = Plan.from_json(shared[0])
    graph = build_graph(captured, NodeCosts({}, {}, {}), "flops")
    staged = stages_from_plan(graph, plan)
    device = rank % par.devices
    job = WorkerJob(plan=plan, segments=staged.stage_segments(stage_of_device(device, plan.n)),
                    specs=staged.specs, placeholders=staged.placeholders,
                    output=staged.output, parallel=par,
                    sampling=sampling_jobs(bundle, cfg, par.replicas))
    del bundle, captured, graph, staged  # keep only this rank's stage
    dist.barrier()
    t0 = time.perf_counter()
    latent, stats = run_job(job, rank, world)
    wall = time.perf_counter() - t0
    if device == 0:
        torch.save(latent, out / f"result_replica{rank // par.devices}.pt")
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(
            {"latency_s": wall, "plan_hash": plan.plan_hash, "world": world}, indent=1))
        (out / "plan.json").write_text(plan.to_json())
    dist.barrier()
    dist.destroy_process_group()


def run_spawn(cfg: DictConfig, out: Path) -> None:
    par = parallel_spec(plain(cfg.parallel))
    part = plain(cfg.partition)
    bundle = zoo.build(plain(cfg.model), seed=cfg.seed)
    inputs = bundle.inputs(cfg.seed)
    compiled = compile_model(bundle.module, bundle.specs, inputs, partition_request(part, par.n),
                             strategy=part["strategy"], cost_model=part["cost_model"],
                             name=f"{bundle.name}/{bundle.variant}",
                             config_hash=bundle.config_hash, repeats=part["repeats"],
                             threads=part["threads"])
    jobs = sampling_jobs(bundle, cfg, par.replicas)
    result = launch(compiled.staged, compiled.plan, par, jobs)
    torch.set_num_threads(par.threads)
    t0 = time.perf_counter()
    ref = sample(SequentialDenoiser(compiled.staged), make_scheduler(jobs[0].scheduler),
                 jobs[0].x_T, jobs[0].cond, steps=jobs[0].steps)
    t_seq = time.perf_counter() - t0
    rel = ((result.latents[0] - ref).norm() / ref.norm()).item()
    metrics = {"latency_s": result.wall_s, "sequential_s": t_seq,
               "speedup": t_seq / result.wall_s, "relative_l2_vs_sequential": rel,
               "plan_hash": compiled.plan.plan_hash, "devices": par.devices,
               "bytes_per_step": compiled.plan.bytes_per_step}
    torch.save(result.latents, out / "result.pt")
    (out / "plan.json").write_text(compiled.plan.to_json())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@exit_on_bad_input
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        run_torchrun(cfg, out)
    else:
        run_spawn(cfg, out)


if __name__ == "__main__":
    main()
