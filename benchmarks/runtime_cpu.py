"""Benchmark: the asynchronous pipeline on this CPU machine, measured side by side.

    python benchmarks/runtime_cpu.py [--steps 50] [--configs 2:1,2:2,3:1,4:1] [--plot out.png]
    python benchmarks/runtime_cpu.py --configs cfg,2:1,2:1:c5,cfg2:1 --guidance 7.5

A config is ``N:S``, ``N:S:cC`` (cool-down: the last C steps sequential), ``cfg`` (CFG-parallel:
the two guidance halves on two workers, whole model each) or ``cfgN:S[:cC]`` (the hybrid, one
pipeline per half on 2·(N−1+S) workers). With ``--guidance`` every row samples with
classifier-free guidance: the latent batch is 1 and each step runs [uncond, cond] (batch 2,
the model's example) — one call of the batch in the sequential sampler and the pipeline,
one call per half in CFG-parallel, on a plan captured for one row.

Model: the SD 1.5 block layout at reduced width (block_out_channels 64/128/128/128, latent
32×32, batch 2 as with classifier-free guidance), random weights, sized so one forward takes
over 100 ms on one thread. For each N:S it runs the pipeline (W=1, one thread per worker)
and compares it with (a) the sequential sampler on one thread and (b) the sequential sampler
on all the machine's cores (or as many threads as workers, if fewer) — what a CPU user would
otherwise do. With more workers than cores the pipeline is oversubscribed, and its ideal
speedup is bounded by the cores, not by T / (W + ⌈(T−W)/S⌉/N). It
prints speedups, parallel efficiency against the ideal T / (W + ⌈(T−W)/S⌉/N), bytes and
waiting per step, and peak memory per worker, and plots the per-device timeline of a few
steps. Numbers on a shared 2-core VM are noisy: run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from asyncdiff.denoiser import SequentialDenoiser
from asyncdiff.distributed.launch import launch
from asyncdiff.distributed.worker import SamplingJob
from asyncdiff.schedule import Schedule
from asyncdiff.guidance import GuidanceSplit
from experiments import zoo
from partition import PartitionRequest, compile_model
from schedulers import make_scheduler, sample

CONFIG = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [64, 128, 128, 128], "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 64, "attention_head_dim": 8,
}


def build(rows: int = 2):
    model = zoo.diffusers_from_config("diffusers.UNet2DConditionModel", CONFIG, seed=0)
    specs = tuple(zoo.InputSpec.from_dict(d) for d in [
        {"name": "sample", "shape": [rows, 4, 32, 32], "role": "latent"},
        {"name": "timestep", "shape": [], "role": "timestep", "init": "timestep"},
        {"name": "encoder_hidden_states", "shape": [rows, 16, 64]}])
    return model, specs, zoo.example_inputs(list(specs), 0)


def sequential(staged, job: SamplingJob, threads: int,
               halves: bool = False) -> tuple[torch.Tensor, float]:
    """The sequential sampler; ``halves``: one call per guidance half (CFG-parallel's
    reference, on the one-row plan ``staged``)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    den = GuidanceSplit([SequentialDenoiser(staged)] * 2) if halves else SequentialDenoiser(staged)
    out = sample(den, make_scheduler(job.scheduler), job.x_T, job.cond, steps=job.steps,
                 guidance_scale=job.guidance, uncond=job.uncond)
    return out, time.perf_counter() - t0


def parse(config: str) -> tuple[bool, int, int, int]:
    """``[cfg]N:S[:cC]`` or ``cfg`` -> (cfg_parallel, N, S, C)."""
    cfg = config.startswith("cfg")
    parts = (config[3:] if cfg else config) or "1:1"
    n, s, *rest = parts.split(":")
    cooldown = int(rest[0].removeprefix("c")) if rest else 0
    return cfg, int(n), int(s), cooldown


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s [{min(xs):.2f}–{max(xs):.2f}]"


def plot_timeline(result, path: str, rounds: range) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 1 + 0.5 * len(result.stats)))
    for rank, stats in sorted(result.stats.items()):
        chosen = [s for s in stats if s.round in rounds]
        t0 = min(s.start for st in result.stats.values() for s in st if s.round in rounds)
        for s in chosen:
            ax.barh(rank, (s.computed - s.start) * 1e3, left=(s.start - t0) * 1e3,
                    color="tab:blue")
            ax.barh(rank, (s.done - s.computed) * 1e3, left=(s.computed - t0) * 1e3,
                    color="tab:orange")
    ax.set_yticks(sorted(result.stats), [f"device {r}" for r in sorted(result.stats)])
    ax.set_xlabel("ms (blue: compute, orange: waiting for values and ε)")
    ax.set_title(f"per-device timeline, rounds {rounds.start}–{rounds.stop - 1}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--configs", default="2:1,2:2,3:1,4:1", help="N:S pairs")
    ap.add_argument("--plot", default="docs/timeline_n2s1.png")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each configuration and baseline, interleaved; medians reported")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (needed by cfg rows)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, specs, inputs = build()
    c1 = compile_model(model, specs, inputs, PartitionRequest(n=1), cost_model="flops",
                       repeats=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            c1.graph.captured(inputs)
    fwd = (time.perf_counter() - t0) / 3 * 1e3
    cond = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
    x_T = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(1))
    job = SamplingJob("ddim", args.steps, x_T, cond)
    if args.guidance is not None:  # latent batch 1; [uncond, cond] is the example's batch 2
        job = SamplingJob("ddim", args.steps, x_T[:1], {k: v[1:] for k, v in cond.items()},
                          guidance=args.guidance, uncond={k: v[:1] for k, v in cond.items()})
    print(f"model: SD 1.5 layout, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, one forward {fwd:.0f} ms on 1 thread (batch 2); {args.steps} DDIM steps, "
          f"W={args.warmup}, guidance {args.guidance}")
    seq_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    ref, _ = sequential(c1.staged, job, 1)
    half = None
    for pair in args.configs.split(","):
        cfg, n, s, cooldown = parse(pair)
        if cfg and args.guidance is None:
            raise SystemExit(f"error: --configs {pair}: CFG-parallel needs --guidance")
        par = Schedule(n=n, stride=s, warmup=args.warmup, cooldown=cooldown, cfg_parallel=cfg)
        threads = min(par.world_size(), os.cpu_count() or 1)
        torch.set_num_threads(1)
        if cfg and half is None:  # the plan of one guidance half: one row
            half = build(rows=1)
        m, sp, inp = half if cfg else (model, specs, inputs)
        c = compile_model(m, sp, inp, PartitionRequest(n=n), cost_model="time",
                          repeats=3, threads=1, captured=None if cfg else c1.graph.captured)
        walls, seq1s, seqps = [], [], []
        for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit all three
            seq1s.append(sequential(c1.staged, job, 1)[1])
            seqps.append(sequential(c1.staged, job, threads)[1])
            result = launch(c.staged, c.plan, par, [job])
            walls.append(result.wall_s)
        out = result.latents[0]
        wall, t_seq1, t_seqp = (statistics.median(x) for x in (walls, seq1s, seqps))
        tl = par.timeline(args.steps, clamp=True)
        seq_rounds = sum(r.sequential for r in tl.rounds)
        ideal = par.groups * args.steps / (seq_rounds + len(tl.parallel_rounds) / n)
        sp1 = t_seq1 / wall
        spp = t_seqp / wall
        torch_speedup = t_seq1 / t_seqp
        parallel = {r.index for r in tl.parallel_rounds}
        par_rounds = [st for st in result.stats[0] if st.round in parallel]
        wait = statistics.mean((st.done - st.computed) * 1e3 for st in par_rounds)
        step = statistics.mean((st.done - st.start) * 1e3 for st in par_rounds)
        sent = sum(st.bytes_sent for r in result.stats.values() for st in r
                   if st.round >= args.warmup) / len(par_rounds)
        rel = ((out - ref).norm() / ref.norm()).item()
        name = ("CFG-parallel" if n == 1 else f"hybrid CFG × N={n} S={s}") if cfg else \
            f"N={n} S={s}"
        name += f" C={cooldown}" if cooldown else ""
        print(f"\n{name} on {par.world_size()} workers × 1 thread: {spread(walls)}  "
              f"(sequential: {spread(seq1s)} on 1 thread, {spread(seqps)} on "
              f"{threads} threads; medians of {args.repeats})")
        print(f"  speedup {sp1:.2f}x vs 1 thread (ideal {ideal:.2f}x, efficiency "
              f"{sp1 / ideal:.2f});  {spp:.2f}x vs {threads} threads (ceiling "
              f"{ideal / torch_speedup:.2f}x = ideal / torch's own {torch_speedup:.2f}x; "
              f"{spp / (ideal / torch_speedup):.2f} of it)")
        if cfg and (n == 1 or args.warmup + cooldown >= args.steps):
            exact = torch.equal(out, sequential(c.staged, job, 1, halves=True)[0])
            print(f"  equal to the sequential sampler calling each half alone: {exact}")
        print(f"  per parallel round on device 0: {step:.1f} ms, waiting {wait:.1f} ms "
              f"({wait / step:.0%}); {sent / 2**20:.2f} MiB sent per round, all devices")
        peaks = [v / 2**30 for _, v in sorted(result.peak_rss.items())]
        print(f"  peak RSS per worker {[round(p, 2) for p in peaks]} GiB; the sequential "
              f"process {seq_rss / 2**10:.2f} GiB; drift vs sequential rel. L2 {rel:.4f}")
        if n == 2 and s == 1 and not cfg and not cooldown and args.plot:
            plot_timeline(result, args.plot, range(args.warmup + 2, args.warmup + 6))
            print(f"  timeline plot: {args.plot}")


if __name__ == "__main__":
    main()
