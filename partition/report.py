"""Tables for people: the plan per stage, and the performance prediction (docs/design.md §4)."""
from __future__ import annotations

import logging
import math

from tabulate import tabulate

from partition.plan import Plan

log = logging.getLogger(__name__)

# CPU loopback gloo, one way (measured on this kind of machine): ~0.07 ms + ~3.4 GB/s.
COMM_LATENCY_MS = 0.07
COMM_BYTES_PER_MS = 3.4e6


def comm_ms(nbytes: int, latency_ms: float = COMM_LATENCY_MS,
            bytes_per_ms: float = COMM_BYTES_PER_MS) -> float:
    return latency_ms + nbytes / bytes_per_ms if nbytes else 0.0


def predict(plan: Plan, steps: int = 50, warmup: int = 1, stride: int = 1,
            rounds: int | None = None, *, groups: int = 1, cached: int = 0,
            ms_per_flop: float | None = None, comm: bool = True) -> dict:
    """Latency ≈ W·(t_full + t_seq_comm) + R·(max_n t(E^n) + t_comm) + M·t(E^N)
    + (G−1)·T·t_ε; speedup over the sequential sampler on one device. W: the sequential
    steps (warm-up, sync, cool-down; a step cache's full steps), R: the timeline's parallel
    rounds (``rounds``; default ⌈(T−W−M)/S⌉, which the public code's schedule with an even W
    beats by its load-only step: pass the timeline's count), M: a step cache's ``cached``
    steps (the last stage alone), G: guidance ``groups`` (2: CFG-parallel; the plan is
    one guidance half's, the sequential sampler runs both halves on one device, and each
    step swaps one ε half, t_ε, whatever ``comm`` says).

    t_full (the sequential step) counts every node once (``Plan.step_flops``, or the measured
    whole forward): the conditioning each stage replicates is extra work of the pipeline, not
    of the sequential model. Each stage's time includes the conditioning it recomputes.
    Communication (``comm_ms``: latency + bytes / bandwidth) is counted in milliseconds: with
    measured stage times, or with FLOPs converted at ``ms_per_flop``; in FLOP units it is left
    out (``unit`` says which). A sequential round sends each crossing value once, in turn; a
    parallel round the largest stage input. ``comm=False``: one device (a step cache)."""
    if plan.measured:
        stage, full, unit = list(plan.measured.stage_ms), plan.measured.total_ms, "ms"
        if plan.measured.source == "stages" != plan.measured.step_source:
            log.warning("plan %s: stage times measured on the stages, the sequential step from "
                        "the summed module times (a plan saved by an earlier version): the "
                        "predicted speedup is too high by their timing overhead; compile it "
                        "again", plan.plan_hash)
    elif ms_per_flop:
        stage = [s.flops * ms_per_flop for s in plan.stages]
        full, unit = plan.step_flops * ms_per_flop, "ms"
    else:  # FLOPs as a time proxy
        stage, full, unit = [s.flops for s in plan.stages], plan.step_flops, "flops"
    per_stage_in = [sum(v.bytes for v in plan.values if s in v.consumers) + plan.output_bytes
                    for s in range(plan.n)]
    timed = unit == "ms" and comm
    t_comm = comm_ms(max(per_stage_in)) if timed and plan.n > 1 else 0.0
    t_seq_comm = sum(comm_ms(v.bytes) for v in plan.values) if timed and plan.n > 1 else 0.0
    t_eps = comm_ms(plan.output_bytes) if unit == "ms" and groups > 1 else 0.0
    if rounds is None:
        rounds = math.ceil(max(steps - warmup - cached, 0) / stride)
    step = max(stage) + t_comm
    latency = (warmup * (full + t_seq_comm) + rounds * step + cached * stage[-1]
               + (groups - 1) * steps * t_eps)
    seq = steps * full * groups
    ideal = steps * groups / (warmup + (rounds / plan.n if plan.n else 0)
                              + cached * stage[-1] / full)
    return {"steps": steps, "warmup": warmup, "stride": stride, "step_ms": step,
            "comm_ms": t_comm, "seq_comm_ms": t_seq_comm, "eps_comm_ms": t_eps,
            "latency_ms": latency, "sequential_ms": seq,
            "speedup": seq / latency if latency else 1.0, "ideal_speedup": ideal,
            "unit": unit}


def format_plan(plan: Plan, steps: int = 50, warmup: int = 1, stride: int = 1,
                rounds: int | None = None) -> str:
    rows = []
    ms = plan.measured.stage_ms if plan.measured else [None] * plan.n
    for st, t in zip(plan.stages, ms):
        span = "; ".join(f"{sg.first_module or '<glue>'} … {sg.last_module or '<glue>'}"
                         for sg in st.segments)
        rows.append([st.index, span, f"{t:.2f}" if t is not None else "-",
                     f"{(st.flops - st.cond_flops) / 1e9:.4f}+{st.cond_flops / 1e9:.4f}",
                     f"{st.params / 1e6:.3f}+{st.replicated_params / 1e6:.3f}",
                     len(st.inputs),
                     f"{sum(v.bytes for v in plan.values if st.index in v.consumers) / 2**20:.3f}",
                     _hoisted_cell(plan, st.index)])
    timed = f"ms ({plan.measured.device}, {plan.measured.source})" if plan.measured else "ms"
    head = ["stage", "modules", timed, "GFLOPs/step own+cond", "params M own+replicated",
            "inputs", "MiB in", "once per run"]
    p = predict(plan, steps, warmup, stride, rounds)
    lines = [f"plan for {plan.model}: N={plan.n}, strategy={plan.strategy}, "
             f"cost model={plan.cost_model}, depth={plan.depth}, backend={plan.backend}, "
             f"hash={plan.plan_hash}",
             tabulate(rows, head, tablefmt="github"),
             f"imbalance (max/mean, {plan.cost_model}, conditioning included): "
             f"{plan.imbalance:.3f}"
             + (f"   time: {plan.time_imbalance:.3f}" if plan.time_imbalance else "")
             + f"   FLOPs: {plan.flops_imbalance:.3f}",
             f"bytes crossing per step: {plan.bytes_per_step / 2**20:.3f} MiB "
             f"({len(plan.values)} tensors point-to-point + ε to {plan.n - 1} devices)",
             f"predicted (T={steps}, {warmup} sequential, S={stride}): step {p['step_ms']:.2f} "
             f"{p['unit']}, speedup {p['speedup']:.2f}x (ideal {p['ideal_speedup']:.2f}x)"]
    if plan.hoisted:
        sent = [h for h in plan.hoisted if h.home >= 0]
        lines.append(f"computed once per run, not per step: {len(plan.hoisted)} value(s)"
                     + (f"; {len(sent)} sent from their home stage "
                        f"({plan.hoisted_bytes_per_run / 2**20:.3f} MiB per run)" if sent else ""))
    lines.append(f"verified: {plan.verification or 'no'}")
    if plan.uncounted_ops:
        lines.append("ops counted as 0 FLOPs (not matmul/conv/attention or a known zero op): "
                     + ", ".join(f"{k}×{v}" for k, v in plan.uncounted_ops))
    lines += [f"note: {x}" for x in plan.notes]
    return "\n".join(lines)


def _hoisted_cell(plan: Plan, stage: int) -> str:
    home = [h for h in plan.hoisted if h.home == stage]
    own = [h for h in plan.hoisted if h.home == -1 and stage in h.consumers]
    got = [h for h in plan.hoisted if h.home not in (-1, stage) and stage in h.consumers]
    st = plan.stages[stage]
    parts = []
    if own or home:
        parts.append(f"computes {len(own) + len(home)} ({st.hoisted_flops / 1e9:.4f} GFLOPs)")
    if home:
        parts.append(f"sends {len(home)}")
    if got:
        parts.append(f"receives {len(got)}")
    return ", ".join(parts) or "-"
