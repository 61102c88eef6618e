"""asyncdiff-plan: capture a model, cost it, cut it into N stages, print the table, write plan.json.

    asyncdiff-plan model=sd15 parallel.n=4
    asyncdiff-plan model=sdxl partition=shell_core parallel.n=3
    asyncdiff-plan model=sd21 partition=paper_sd21_n2 model.variant=full
    asyncdiff-plan parallel.n=3 parallel.stride=2 parallel.warmup=2 print_comm=true  # + comm.txt
"""
from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments import atomic
from experiments.cli import checked
from asyncdiff.lowering import check, lower
from experiments.common import (CONF_DIR, exit_on_bad_input, parallel_rounds,
                                partition_request, plain, requested, schedule_of,
                                sequential_rounds)
from experiments.checks import resolved
from partition import compile_model, format_plan
from experiments import zoo


def plan_from_config(cfg: DictConfig, out_dir: Path | None):
    model_cfg, part, par = plain(cfg.model), plain(cfg.partition), plain(cfg.parallel)
    sch = schedule_of(par)
    request = partition_request(part, sch.n)
    t0 = time.perf_counter()
    bundle = zoo.build(model_cfg, seed=cfg.seed)
    inputs = bundle.inputs(cfg.seed)
    t_build = time.perf_counter() - t0
    with torch.no_grad(), requested():
        compiled = compile_model(
            bundle.module, bundle.specs, inputs, request, strategy=part["strategy"],
            cost_model=part["cost_model"], name=f"{bundle.name}/{bundle.variant}",
            config_hash=bundle.architecture, repeats=int(part.get("repeats", 1)),
            threads=part.get("threads"), device=part.get("device"), contract=bundle.contract,
            verify=bool(part.get("verify", True)), backend=part.get("backend", "auto"))
    t_plan = time.perf_counter() - t0 - t_build
    if cfg.print_report:
        print(format_plan(compiled.plan, steps=cfg.scheduler.steps,
                          warmup=sequential_rounds(sch, cfg.scheduler.steps),
                          stride=sch.stride, rounds=parallel_rounds(sch, cfg.scheduler.steps)))
        print(f"build {t_build:.1f} s, plan {t_plan:.1f} s")
    if out_dir is not None:
        path = out_dir / cfg.out
        atomic.write_text(path, compiled.plan.to_json())
        print(f"wrote {path}")
    if cfg.get("print_comm"):
        comm = lower(sch.timeline(cfg.scheduler.steps, clamp=True), compiled.plan,
                     groups=sch.groups, replicas=sch.replicas)
        check(comm)  # what would be posted completes under NCCL's rules
        text = f"{comm}\nreplayed under NCCL's rules: every rank completes"
        print(text)
        if out_dir is not None:
            atomic.write_text(out_dir / "comm.txt", text + "\n")
    return compiled


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@exit_on_bad_input
def hydra_main(cfg: DictConfig) -> None:
    cfg = resolved(cfg, "plan")
    plan_from_config(cfg, Path(HydraConfig.get().runtime.output_dir))


main = checked(hydra_main, "plan")  # the console script is experiments.cli.plan_main

if __name__ == "__main__":
    main()
