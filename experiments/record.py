"""What a run leaves in its output directory, as plain data.

    <run dir>/config.yaml     the resolved config
              plan.json       the Plan (partition/plan.py), plan.txt its table
              metrics.json    latency, speedup, quality vs sequential, MACs, bytes (one flat dict)
              timeline.json   per rank and round: start, compute end, done, bytes sent
              result.pt       the asynchronous final latents (one per replica), sequential.pt
              images/         latents.png, timeline.png
              wandb/          the W&B run (offline by default)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from asyncdiff.lowering import place
from experiments import atomic

import torch

from experiments import metrics as M
from experiments import quality as Q
from experiments.common import parallel_rounds, sequential_rounds
from experiments.learned import learned_metrics
from experiments.wandb_log import RunLogger
from partition import Plan, format_plan
from partition.report import predict


def timeline_rows(stats: Mapping[int, Sequence], devices: int, groups: int = 1,
                  placement: Mapping[int, dict] | None = None) -> list[dict]:
    """Per-rank ``RoundStats`` as rows. Times are seconds since each rank's executor started
    (the ranks meet at the plan-hash check just before, so the clocks agree to a few ms).
    ``placement``: per rank, where it ran (host, local rank, device; torchrun)."""
    rows = []
    for rank in sorted(stats):
        replica, group, device = place(rank, devices, groups)  # group: the guidance half
        where = (placement or {}).get(rank, {})
        for s in stats[rank]:
            rows.append({"rank": rank, **where, "replica": replica, "group": group,
                         "device": device,
                         "round": s.round,
                         "stage": s.stage, "start_s": s.start, "computed_s": s.computed,
                         "done_s": s.done, "compute_ms": (s.computed - s.start) * 1e3,
                         "round_ms": (s.done - s.start) * 1e3, "bytes_sent": s.bytes_sent})
    return rows


def predicted(plan: Plan, schedule, steps: int) -> dict:
    """The latency prediction (``partition.predict``) of a run of ``steps`` on ``plan``: the
    rounds its timeline has."""
    return predict(plan, steps=steps, warmup=sequential_rounds(schedule, steps),
                   stride=schedule.stride, rounds=parallel_rounds(schedule, steps),
                   groups=schedule.groups)


def save_plans(cfg, out: Path, plans: Sequence[Plan], schedule, steps: int) -> str:
    """What every run directory starts with: the resolved config, the plan (the first, as
    JSON) and every plan's table (``plan.txt``); returns the table."""
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if not plans:
        return ""
    atomic.write_text(out / "plan.json", plans[0].to_json())
    table = "\n\n".join(format_plan(p, steps=steps, warmup=sequential_rounds(schedule, steps),
                                    stride=schedule.stride,
                                    rounds=parallel_rounds(schedule, steps)) for p in plans)
    atomic.write_text(out / "plan.txt", table + "\n")
    return table


def log_run(data: dict, out: Path, name: str, plans: Sequence[Plan], metrics: dict,
            images: dict, rows: list[dict] | None = None, job_type: str = "run") -> None:
    """The W&B run of a finished run, after the timed runs (its service would compete for the
    cores); in a sweep, grouped by the sweep's directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    group = None
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = Path(HydraConfig.get().sweep.dir).name
    logger = RunLogger(data["wandb"], data, out, group=group, name=name, job_type=job_type)
    for p in plans[:1]:
        logger.plan(p)
    if rows is not None:
        logger.timings(rows)
    logger.metrics(metrics)
    logger.images(images)
    logger.finish()


def run_metrics(*, plan: Plan, schedule, steps: int, latency_s: float, sequential_s: float,
                out: torch.Tensor, ref: torch.Tensor, rows: list[dict],
                peak_rss: Mapping[int, int] | None, weights_dir) -> dict:
    """One flat dict per run: the row of a sweep's results table."""
    pred = predicted(plan, schedule, steps)
    sent = M.bytes_sent(rows)
    macs = M.macs_per_device(plan, schedule.devices)
    out_m = {
        "latency_s": latency_s, "sequential_s": sequential_s,
        "speedup": M.speedup(sequential_s, latency_s),
        "predicted_speedup": pred["speedup"], "ideal_speedup": pred["ideal_speedup"],
        "psnr_db": Q.psnr(out, ref), "ssim": Q.ssim(out, ref),
        "relative_l2": Q.relative_l2(out, ref),
        "max_abs_diff": float((out.double() - ref.double()).abs().max()),
        "devices": schedule.devices, "world": schedule.world_size(),
        "macs_per_device": macs, "max_device_macs": max(macs),
        "bytes_sent_total": sum(sent.values()), "bytes_sent_per_rank": list(sent.values()),
        "plan_bytes_per_step": plan.bytes_per_step, "imbalance": plan.imbalance,
        "plan_hash": plan.plan_hash,
    }
    if peak_rss:
        out_m["peak_rss_mb_max"] = max(peak_rss.values()) / 2**20
    out_m.update(learned_metrics(None, None, weights_dir))  # latents only: no decoded images
    return out_m


def identity(cfg: Mapping) -> dict:
    """The config keys a results table is indexed by."""
    par, sch = cfg["parallel"], cfg["scheduler"]
    return {"model": f"{cfg['model']['name']}/{cfg['model'].get('variant', 'tiny')}",
            "scheduler": sch["name"], "steps": sch["steps"], "guidance": sch.get("guidance"),
            "strategy": cfg["partition"]["strategy"], "n": par["n"], "stride": par["stride"],
            "warmup": par["warmup"], "cooldown": par.get("cooldown", 0),
            "sync": list(par.get("sync") or ()),
            "time_shift": par["time_shift"],
            "stride_noise": par["stride_noise"], "replicas": par["replicas"], "seed": cfg["seed"]}


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data) -> None:
    """Strict JSON (non-finite floats become null), written whole or not at all."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return _finite(x)
    atomic.write_json(path, clean(data), allow_nan=False)
