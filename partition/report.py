"""Tables for people: the plan per stage, and the performance prediction (DESIGN.md §4)."""
from __future__ import annotations

import math

from tabulate import tabulate

from partition.plan import Plan

# CPU loopback gloo, one way (research/feasibility.md §4): ~0.07 ms + ~3.4 GB/s.
COMM_LATENCY_MS = 0.07
COMM_BYTES_PER_MS = 3.4e6


def comm_ms(nbytes: int, latency_ms: float = COMM_LATENCY_MS,
            bytes_per_ms: float = COMM_BYTES_PER_MS) -> float:
    return latency_ms + nbytes / bytes_per_ms if nbytes else 0.0


def predict(plan: Plan, steps: int = 50, warmup: int = 1, stride: int = 1) -> dict:
    """Latency ≈ W·t_full + ⌈(T−W)/S⌉·(max_n t(E^n) + t_comm); speedup over one device."""
    stage = (list(plan.measured.stage_ms) if plan.measured
             else [s.flops for s in plan.stages])  # FLOPs as a time proxy if nothing measured
    full = sum(stage)
    per_stage_in = [sum(v.bytes for v in plan.values if s in v.consumers) + plan.output_bytes
                    for s in range(plan.n)]
    comm = comm_ms(max(per_stage_in)) if plan.measured and plan.n > 1 else 0.0
    rounds = math.ceil(max(steps - warmup, 0) / stride)
    step = max(stage) + comm
    latency = warmup * full + rounds * step
    seq = steps * full
    ideal = steps / (warmup + rounds / plan.n) if plan.n else 1.0
    return {"steps": steps, "warmup": warmup, "stride": stride, "step_ms": step,
            "comm_ms": comm, "latency_ms": latency, "sequential_ms": seq,
            "speedup": seq / latency if latency else 1.0, "ideal_speedup": ideal,
            "unit": "ms" if plan.measured else "flops"}


def format_plan(plan: Plan, steps: int = 50, warmup: int = 1, stride: int = 1) -> str:
    rows = []
    ms = plan.measured.stage_ms if plan.measured else [None] * plan.n
    for st, t in zip(plan.stages, ms):
        span = "; ".join(f"{sg.first_module or '<glue>'} … {sg.last_module or '<glue>'}"
                         for sg in st.segments)
        rows.append([st.index, span, f"{t:.2f}" if t is not None else "-",
                     f"{st.flops / 1e9:.4f}", f"{st.macs / 1e9:.4f}",
                     f"{st.params / 1e6:.3f}+{st.replicated_params / 1e6:.3f}",
                     len(st.inputs), f"{sum(v.bytes for v in plan.values if st.index in v.consumers) / 2**20:.3f}"])
    head = ["stage", "modules", f"ms ({plan.measured.device})" if plan.measured else "ms",
            "GFLOPs", "GMACs", "params M (own+repl)",
            "inputs", "MiB in"]
    p = predict(plan, steps, warmup, stride)
    lines = [f"plan for {plan.model}: N={plan.n}, strategy={plan.strategy}, "
             f"cost model={plan.cost_model}, depth={plan.depth}, hash={plan.plan_hash}",
             tabulate(rows, head, tablefmt="github"),
             f"imbalance (max/mean, {plan.cost_model}): {plan.imbalance:.3f}"
             + (f"   time: {plan.time_imbalance:.3f}" if plan.time_imbalance else "")
             + f"   FLOPs: {plan.flops_imbalance:.3f}",
             f"bytes crossing per step: {plan.bytes_per_step / 2**20:.3f} MiB "
             f"({len(plan.values)} tensors point-to-point + ε to {plan.n - 1} devices)",
             f"predicted (T={steps}, W={warmup}, S={stride}): step {p['step_ms']:.2f} "
             f"{p['unit']}, speedup {p['speedup']:.2f}x (ideal {p['ideal_speedup']:.2f}x)"]
    if plan.uncounted_ops:
        lines.append("ops counted as 0 FLOPs (not matmul/conv/attention or a known zero op): "
                     + ", ".join(f"{k}×{v}" for k, v in plan.uncounted_ops))
    lines += [f"note: {x}" for x in plan.notes]
    return "\n".join(lines)
