"""Predict the speedups of the full-size SD 2.1 UNet on 2-4 GPUs and set them beside the
paper's Table 1 (A5000, 50 DDIM steps, research/paper.md §2.2).

    python benchmarks/scaling_sd21.py [--bandwidth-gbs 12] [--latency-us 30] [--warmup 1 3]
                                      [--serial-s 0 0.4]

The plan supplies what a GPU run would depend on: each stage's share of the FLOPs (the UNet
is captured at the paper's batch 2 = CFG, 96x96 latent, 77 text tokens) and the exact bytes
that cross each cut. The model:

* one full forward takes t_full = the paper's own sequential latency / 50 (5.51 s / 50: an
  upper bound, as the paper's latency also holds the text encoder and VAE);
* a stage takes t_full x its FLOP share (FLOPs track GPU time for these large convolutions
  far better than CPU time: research/feasibility.md);
* a round takes the busiest stage plus the receive of its inputs and ε,
  α + bytes / B, in fp16 (half our fp32 bytes), with B a PCIe peer-to-peer bandwidth
  (default 12 GB/s) and α a per-message latency (default 30 µs): "serial";
  or none of it, when the sends overlap compute entirely: "overlapped";
* latency = W·t_full + ⌈(T−W)/S⌉·round, speedup = T·t_full / latency;
* ``--serial-s`` moves that many seconds of the paper's 5.51 s out of the UNet into work no
  split parallelises (text encoder, VAE decode, scheduler): t_full = (5.51 − serial) / T and
  both latencies gain the serial time (Amdahl).

Printed for our balanced split and the paper's hand split (conf/partition/paper_sd21_n*.yaml).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import yaml

from partition import PartitionRequest, compile_graph, zoo
from partition.capture import capture
from partition.cost import profile
from partition.graph import build_graph

ROOT = Path(__file__).resolve().parents[1]
PAPER_S = 5.51  # SD 2.1 original, 50 DDIM steps, one A5000 (Table 1)
PAPER = {(2, 1): (1.8, 3.03), (3, 1): (2.3, 2.41), (4, 1): (2.6, 2.10), (2, 2): (3.0, 1.82),
         (3, 2): (4.0, 1.35)}  # (N, S) -> (speedup, latency s)


def predict(shares, in_bytes, steps, warmup, stride, t_full, bw, alpha, overlap,
            serial_s=0.0) -> float:
    comm = 0.0 if overlap else alpha + max(in_bytes) / 2 / bw  # fp16 on the GPU
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
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = zoo.load_yaml("sd21")
    t0 = time.perf_counter()
    bundle = zoo.build(cfg, variant="full", seed=0)
    inputs = bundle.inputs(0)
    with torch.no_grad():
        captured = capture(bundle.module, bundle.specs, inputs)
        costs = profile(captured, inputs, repeats=0)
    graph = build_graph(captured, costs, "flops")
    print(f"full SD 2.1 UNet: {sum(p.numel() for p in bundle.module.parameters()) / 1e6:.0f}M "
          f"params, latent {tuple(inputs['sample'].shape)}; captured and counted in "
          f"{time.perf_counter() - t0:.0f} s")
    bw, alpha = args.bandwidth_gbs * 1e9, args.latency_us * 1e-6
    plans = {}
    for (n, s), _ in PAPER.items():
        splits = {"ours": ("balanced", {})}
        paper_cfg = ROOT / f"conf/partition/paper_sd21_n{n}.yaml"
        if paper_cfg.is_file():
            b = yaml.safe_load(paper_cfg.read_text())["partition"]["boundaries"]
            splits["paper"] = ("manual", {"boundaries": b})
        for name, (strategy, options) in splits.items():
            if (n, name) not in plans:
                plans[n, name] = compile_graph(
                    graph, PartitionRequest(n=n, depth=4, options=options), strategy=strategy,
                    cost_model="flops", name="sd21/full", config_hash=bundle.config_hash).plan
    for warmup in args.warmup:
        for serial in args.serial_s:
            t_full = (PAPER_S - serial) / args.steps
            print(f"\nW = {warmup}; UNet step t_full = ({PAPER_S} − {serial:g}) s / {args.steps} "
                  f"= {t_full * 1e3:.1f} ms, serial {serial:g} s; B = {args.bandwidth_gbs:g} "
                  f"GB/s, α = {args.latency_us:g} µs")
            head = (f"{'config':10s} {'split':6s} {'FLOP shares':24s} {'MiB in (fp16)':>13s} "
                    f"{'ideal':>6s} {'overlapped':>10s} {'serial':>7s} {'paper':>6s}")
            print(head)
            print("-" * len(head))
            for (n, s), (paper_speedup, _) in PAPER.items():
                for name in ("ours", "paper"):
                    plan = plans.get((n, name))
                    if plan is None:
                        continue
                    total = sum(st.flops for st in plan.stages)
                    shares = [st.flops / total for st in plan.stages]
                    in_bytes = [sum(v.bytes for v in plan.values if st.index in v.consumers)
                                + plan.output_bytes for st in plan.stages]
                    ideal = args.steps / (warmup + math.ceil((args.steps - warmup) / s) / n)
                    over, ser = (predict(shares, in_bytes, args.steps, warmup, s, t_full, bw,
                                         alpha, overlap, serial) for overlap in (True, False))
                    print(f"N={n} S={s}    {name:6s} {' '.join(f'{x:.3f}' for x in shares):24s} "
                          f"{max(in_bytes) / 2 / 2**20:13.1f} {ideal:5.2f}x {over:9.2f}x "
                          f"{ser:6.2f}x {paper_speedup:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
