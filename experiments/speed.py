"""Predicted speed and per-device work of a quality-study point, for every method the study
compares (sequential with fewer steps, the pipeline, cool-down, CFG-parallel, the hybrid,
the step cache), all against the one reference: the sequential sampler at
``scheduler.steps`` on one device running the batched guidance batch [uncond, cond].

The latency model is ``partition.report.predict`` on the point's own plan (one guidance half's
plan for CFG-parallel and the hybrid). Two readings are given: FLOP balance alone (ideal
hardware with these cuts, communication free), and milliseconds, with FLOPs converted at a
measured rate and communication at the loopback gloo model of ``partition/report.py``.
"""
from __future__ import annotations

import statistics
import time

import torch

from asyncdiff.inputs import model_env
from asyncdiff.schedule import Schedule
from experiments.common import parallel_rounds, sequential_rounds
from experiments.metrics import macs_per_device
from partition import predict


def point_schedule(d: dict) -> Schedule:
    """The schedule of study point ``d`` (``experiments.study.describe``)."""
    return Schedule(n=d["n"], stride=d["stride"], warmup=d["warmup"],
                    cooldown=d.get("cooldown", 0), sync=tuple(d.get("sync", ())),
                    time_shift=d["time_shift"], stride_noise=d["stride_noise"],
                    cache_interval=d.get("cache", 0), cfg_parallel=bool(d.get("cfg_parallel")))


def devices_of(d: dict) -> int:
    """Devices a point runs on: 1 (sequential, step cache), N−1+S or N per pipeline, twice
    that with CFG-parallel (a group per guidance half)."""
    return point_schedule(d).world_size()


def point_latency(plan, d: dict, ms_per_flop: float | None = None) -> dict:
    """``predict`` for point ``d`` on its plan (flops, or ms at ``ms_per_flop``)."""
    steps, groups = d["steps"], 2 if d.get("cfg_parallel") else 1
    if d.get("cache"):
        full = len(range(0, steps, d["cache"]))
        return predict(plan, steps, warmup=full, rounds=0, cached=steps - full,
                       ms_per_flop=ms_per_flop, comm=False)
    if d["n"] == 1:
        return predict(plan, steps, warmup=steps, rounds=0, groups=groups,
                       ms_per_flop=ms_per_flop)
    sch = point_schedule(d)
    return predict(plan, steps, warmup=sequential_rounds(sch, steps), stride=d["stride"],
                   rounds=parallel_rounds(sch, steps), groups=groups, ms_per_flop=ms_per_flop)


def point_speed(d: dict, plan, whole_plan, reference_plan, reference_steps: int,
                images_per_forward: int, ms_per_flop: float) -> dict:
    """Speedups over the reference (``reference_plan`` at ``reference_steps`` on one device):
    ``predicted_speedup`` on FLOPs alone, ``predicted_speedup_comm`` in ms with communication;
    the MACs of the busiest device per image over the run (warm-up included, both halves of
    the guidance batch, as AsyncDiff's Table 1 counts them). ``whole_plan``: the N = 1 plan of
    the same batch as ``plan`` (its sequential steps)."""
    flops = point_latency(plan, d)
    timed = point_latency(plan, d, ms_per_flop)
    ref_flops = reference_steps * reference_plan.step_flops
    full = sum(s.macs for s in whole_plan.stages)
    if d.get("cache"):
        busiest = flops["warmup"] * full + (d["steps"] - flops["warmup"]) * plan.stages[-1].macs
    elif d["n"] == 1:
        busiest = d["steps"] * full
    else:
        sch = point_schedule(d)
        busiest = (sequential_rounds(sch, d["steps"]) * full
                   + parallel_rounds(sch, d["steps"]) * max(macs_per_device(plan, sch.devices)))
    return {"devices": devices_of(d), "predicted_speedup": ref_flops / flops["latency_ms"],
            "ideal_speedup": flops["ideal_speedup"] * reference_steps / d["steps"],
            "predicted_speedup_comm": ref_flops * ms_per_flop / timed["latency_ms"],
            "comm_ms_per_round": timed["comm_ms"], "eps_comm_ms": timed["eps_comm_ms"],
            "macs_per_device_g": busiest / images_per_forward / 1e9}


def measured_ms_per_flop(staged, plan, x: torch.Tensor, t, cond, repeats: int = 3) -> float:
    """Milliseconds per FLOP of the whole model on this machine: the median of ``repeats``
    timed forwards of ``staged`` (after one untimed), over ``plan.step_flops``."""
    def forward():
        env = staged.prepare(model_env(staged.specs, staged.placeholders, x, t, cond))
        for seg in staged.segments:
            env.update(seg(env))
    times = []
    with torch.no_grad():
        forward()
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) / plan.step_flops
