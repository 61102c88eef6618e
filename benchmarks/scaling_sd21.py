"""Predict the speedups of the full-size SD 2.1 UNet on 2-4 GPUs and set them beside the
paper's Table 1 (A5000, 50 DDIM steps, AsyncDiff Table 1).

    python benchmarks/scaling_sd21.py [--bandwidth-gbs 12] [--latency-us 30] [--warmup 1 3]
                                      [--serial-s 0 0.4]

The plan supplies what a GPU run would depend on: each stage's share of the FLOPs (the UNet
is captured at the paper's batch 2 = CFG, 96x96 latent, 77 text tokens) and the exact bytes
that cross each cut. The model:

* one full forward takes t_full = the paper's own sequential latency / 50 (5.51 s / 50: an
  upper bound, as the paper's latency also holds the text encoder and VAE);
* a stage takes t_full x its FLOP share (FLOPs track GPU time for these large convolutions
  far better than CPU time: measured separately);
* a round takes the busiest stage plus the receive of its inputs and ε,
  α + bytes / B, in fp16 (half our fp32 bytes), with B a PCIe peer-to-peer bandwidth
  (default 12 GB/s) and α a per-message latency (default 30 µs): "serial";
  or none of it, when the sends overlap compute entirely: "overlapped";
* latency = W·t_full + ⌈(T−W)/S⌉·round, speedup = T·t_full / latency;
* ``--serial-s`` moves that many seconds of the paper's 5.51 s out of the UNet into work no
  split parallelises (text encoder, VAE decode, scheduler): t_full = (5.51 − serial) / T and
  both latencies gain the serial time (Amdahl).

Printed for our balanced split and the paper's hand split (partition/paper_splits/paper_sd21_n*.yaml).

With ``--time-on cuda`` the UNet is captured on the GPU in ``--dtype`` (fp16, as the paper
runs it) and each stage's segments are timed there with CUDA events (median of
``--repeats``); the predictions are then printed a second time with each stage's measured
time over the full forward's in place of its FLOP share (so the conditioning glue that
several devices each run counts for every one of them). A third split joins them,
``ours-t``: our balanced strategy on per-node times measured on the same device
(``--node-repeats`` passes, CUDA events around each node):

    python benchmarks/scaling_sd21.py --time-on cuda [--dtype float16] [--repeats 30]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.timing import median_ms  # noqa: E402
from experiments import zoo  # noqa: E402
from partition import splits as paper_splits
from partition import PartitionRequest, compile_graph  # noqa: E402
from partition.capture import capture  # noqa: E402
from partition.cost import profile  # noqa: E402
from partition.graph import build_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_S = 5.51  # SD 2.1 original, 50 DDIM steps, one A5000 (Table 1)
PAPER = {(2, 1): (1.8, 3.03), (3, 1): (2.3, 2.41), (4, 1): (2.6, 2.10), (2, 2): (3.0, 1.82),
         (3, 2): (4.0, 1.35)}  # (N, S) -> (speedup, latency s)


def predict(shares, in_bytes, steps, warmup, stride, t_full, bw, alpha, overlap,
            serial_s=0.0) -> float:
    comm = 0.0 if overlap else alpha + max(in_bytes) / bw  # fp16 bytes
    round_s = max(shares) * t_full + comm
    rounds = math.ceil((steps - warmup) / stride)
    return (steps * t_full + serial_s) / (warmup * t_full + rounds * round_s + serial_s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bandwidth-gbs", type=float, default=12.0)
    ap.add_argument("--latency-us", type=float, default=30.0)
    ap.add_argument("--warmup", type=int, nargs="+", default=[1])
    ap.add_argument("--serial-s", type=float, nargs="+", default=[0.0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--time-on", choices=("cuda", "cpu"), default=None,
                    help="also time every stage on this device and predict from time shares")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--node-repeats", type=int, default=5,
                    help="with --time-on: passes that time every node, for a split balanced on "
                         "time (\"ours-t\")")
    ap.add_argument("--variant", choices=("full", "tiny"), default="full",
                    help="tiny: a quick check of this script, not a prediction")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = zoo.load_yaml("sd21")
    t0 = time.perf_counter()
    bundle = zoo.build(cfg, variant=args.variant, seed=0)
    inputs = bundle.inputs(0)
    if args.time_on:
        dtype = getattr(torch, args.dtype) if args.time_on == "cuda" else torch.float32
        bundle.module.to(args.time_on, dtype)
        inputs = {s.name: inputs[s.name].to(args.time_on, dtype if s.role != "timestep"
                                             else inputs[s.name].dtype) for s in bundle.specs}
    with torch.no_grad():
        captured = capture(bundle.module, bundle.specs, inputs, bundle.contract)
        costs = profile(captured, inputs, repeats=args.node_repeats if args.time_on else 0)
    graph = build_graph(captured, costs, "flops")
    params = sum(p.numel() for p in bundle.module.parameters())
    print(f"SD 2.1 UNet ({args.variant}): {params / 1e6:.0f}M params, latent "
          f"{tuple(inputs['sample'].shape)}; captured and counted in "
          f"{time.perf_counter() - t0:.0f} s")
    plans = {}
    for (n, s), _ in PAPER.items():
        splits = {"ours": ("balanced", {})}
        if f"paper_sd21_n{n}" in paper_splits.names():
            splits["paper"] = ("manual", dict(paper_splits.named(f"paper_sd21_n{n}").options))
        for name, (strategy, options) in splits.items():
            if (n, name) not in plans:
                plans[n, name] = compile_graph(
                    graph, PartitionRequest(n=n, depth=4, options=options), strategy=strategy,
                    cost_model="flops", name=f"sd21/{args.variant}",
                    config_hash=bundle.architecture)
    if args.time_on:  # our strategy on the measured per-node times of this device
        time_graph = build_graph(captured, costs, "time")
        for (n, s), _ in PAPER.items():
            if (n, "ours-t") not in plans:
                plans[n, "ours-t"] = compile_graph(
                    time_graph, PartitionRequest(n=n, depth=4), strategy="balanced",
                    cost_model="time", name=f"sd21/{args.variant}",
                    config_hash=bundle.architecture)
    flop_shares = {k: shares_of([st.flops for st in c.plan.stages]) for k, c in plans.items()}
    table(args, {k: c.plan for k, c in plans.items()}, flop_shares, "FLOP shares")
    if args.time_on:
        env = captured.env(inputs)
        whole = median_ms(lambda: captured(inputs), args.repeats, args.time_on)
        dtype_name = args.dtype if args.time_on == "cuda" else "float32"
        print(f"\nmeasured on {device_name(args.time_on)}, {dtype_name}, median of "
              f"{args.repeats}: full forward {whole:.2f} ms; its nodes timed one by one sum to "
              f"{sum(costs.ms.values()):.2f} ms (median of {args.node_repeats})")
        time_shares = {}
        for key, c in plans.items():
            ms = stage_ms(c.staged, env, args.repeats, args.time_on)
            time_shares[key] = [m / whole for m in ms]  # glue run on several devices counts
            print(f"N={key[0]} {key[1]:6s} stage ms {' '.join(f'{m:.2f}' for m in ms)} "
                  f"(sum {sum(ms):.2f}, {sum(ms) / whole:.3f} of the full forward; FLOP shares "
                  f"{' '.join(f'{x:.3f}' for x in flop_shares[key])})")
        table(args, {k: c.plan for k, c in plans.items()}, time_shares,
              "stage time / full fwd")


def shares_of(costs: list[float]) -> list[float]:
    return [c / sum(costs) for c in costs]


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (1 thread)"


def stage_ms(staged, env: dict, repeats: int, device: str) -> list[float]:
    """Each stage's segments timed on the values a full forward computes (as its device runs
    them: its own copy of the per-step conditioning included; what is computed once per run
    is computed first, not timed)."""
    with torch.no_grad():
        full = staged.prepare(env)
        for seg in staged.segments:
            full.update(seg(full))

    def run(segs):
        local = dict(full)
        for seg in segs:
            local.update(seg(local))
    return [median_ms(lambda i=i: run(staged.stage_segments(i)), repeats, device)
            for i in range(staged.n)]


def table(args, plans: dict, shares_by_plan: dict, what: str) -> None:
    bw, alpha = args.bandwidth_gbs * 1e9, args.latency_us * 1e-6
    # the plan's bytes are the capture's: halve float32 ones to the fp16 the paper sends
    per_fp16 = 2 if args.time_on != "cuda" or args.dtype == "float32" else 1
    for warmup in args.warmup:
        for serial in args.serial_s:
            t_full = (PAPER_S - serial) / args.steps
            print(f"\nW = {warmup}; UNet step t_full = ({PAPER_S} − {serial:g}) s / {args.steps} "
                  f"= {t_full * 1e3:.1f} ms, serial {serial:g} s; B = {args.bandwidth_gbs:g} "
                  f"GB/s, α = {args.latency_us:g} µs")
            head = (f"{'config':10s} {'split':6s} {what:24s} {'MiB in (fp16)':>13s} "
                    f"{'ideal':>6s} {'overlapped':>10s} {'serial':>7s} {'paper':>6s}")
            print(head)
            print("-" * len(head))
            for (n, s), (paper_speedup, _) in PAPER.items():
                for name in ("ours", "paper", "ours-t"):
                    plan = plans.get((n, name))
                    if plan is None:
                        continue
                    shares = shares_by_plan[n, name]
                    in_bytes = [(sum(v.bytes for v in plan.values if st.index in v.consumers)
                                 + plan.output_bytes) / per_fp16 for st in plan.stages]
                    ideal = args.steps / (warmup + math.ceil((args.steps - warmup) / s) / n)
                    over, ser = (predict(shares, in_bytes, args.steps, warmup, s, t_full, bw,
                                         alpha, overlap, serial) for overlap in (True, False))
                    print(f"N={n} S={s}    {name:6s} {' '.join(f'{x:.3f}' for x in shares):24s} "
                          f"{max(in_bytes) / 2**20:13.1f} {ideal:5.2f}x {over:9.2f}x "
                          f"{ser:6.2f}x {paper_speedup:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
