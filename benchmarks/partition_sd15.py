"""Benchmark: plan the full-size SD 1.5 UNet (random weights, batch 2, 64×64 latent).

    python benchmarks/partition_sd15.py [--threads 1] [--repeats 1] [--stage-repeats 2]

For N = 2, 3, 4 it reports planning time — capture, cost (the time cost model: one timed
forward of the eager model), partition and verification (one timed run of the stages,
compared bit for bit with that eager forward) — and peak memory, then runs the stages of three
splits — ours (balanced on measured time, conditioning included), an equal-block split and the
paper's hand split — and prints the imbalance of *measured* stage time (max/mean; each stage's
time includes the conditioning it recomputes every step), the bytes our point-to-point exchange
sends per step, and what the official broadcast-everything scheme would send for the same
split (one broadcast of every wrapped module's output to the N−1 other ranks, plus ε).
Everything is measured side by side in this one run.
"""
from __future__ import annotations

import argparse
import resource
import statistics
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
from partition.cost import profile, tensor_bytes  # noqa: E402
from partition.graph import build_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The official code's wrapped modules per component (its split tables, SD 1.5).
OFFICIAL_SD15 = {
    2: [["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3",
         "mid_block", "up_blocks.0", "up_blocks.1.resnets.0", "up_blocks.1.attentions.0",
         "up_blocks.1.resnets.1"],
        ["up_blocks.1.attentions.1", "up_blocks.1.resnets.2", "up_blocks.1.attentions.2",
         "up_blocks.1.upsamplers.0", "up_blocks.2", "up_blocks.3", "conv_norm_out", "conv_out"]],
    3: [["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3"],
        ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2.resnets.0",
         "up_blocks.2.attentions.0", "up_blocks.2.resnets.1", "up_blocks.2.attentions.1",
         "up_blocks.2.resnets.2"],
        ["up_blocks.2.attentions.2", "up_blocks.2.upsamplers.0", "up_blocks.3", "conv_norm_out",
         "conv_out"]],
    4: [["conv_in", "down_blocks.0", "down_blocks.1"],
        ["down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1.resnets.0",
         "up_blocks.1.attentions.0", "up_blocks.1.resnets.1"],
        ["up_blocks.1.attentions.1", "up_blocks.1.resnets.2", "up_blocks.1.attentions.2",
         "up_blocks.1.upsamplers.0", "up_blocks.2"],
        ["up_blocks.3", "conv_norm_out", "conv_out"]],
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def module_output_bytes(cfg: dict, inputs: dict, names: list[str]) -> dict[str, int]:
    """Output bytes of each named module, from a forward on the meta device (no compute)."""
    from partition.spec import call_denoiser
    section = cfg["full"]
    cls = zoo.import_object(cfg["builder"]["cls"])
    with torch.device("meta"):
        model = cls.from_config(section["config"]).eval()
    sizes: dict[str, int] = {}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, name=name: sizes.__setitem__(name, sizes.get(name, 0) + tensor_bytes(o))))
    with torch.no_grad():
        call_denoiser(model, {k: v.to("meta") for k, v in inputs.items()})
    for h in hooks:
        h.remove()
    missing = sorted(set(names) - set(sizes))
    if missing:
        raise ValueError(f"modules never called (a ModuleList?): {missing}")
    return sizes


def measured_stage_ms(staged, env, repeats: int) -> list[float]:
    """Each stage's per-step wall time on the values a full forward computes (its own copy of
    the per-step conditioning included; what is computed once per run, first, not timed)."""
    with torch.no_grad():
        full = staged.prepare(env)
        for seg in staged.segments:
            full.update(seg(full))

    def run(stage: int) -> None:
        local = dict(full)
        for seg in staged.stage_segments(stage):
            local.update(seg(local))
    # one untimed run of each stage first: the first stage timed must not pay the
    # allocator's warm-up for all of them (it read 1.3x slow in a run without it)
    return [median_ms(lambda s=s: run(s), repeats, warmup=1) for s in range(staged.n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes for the cost model")
    ap.add_argument("--stage-repeats", type=int, default=2)
    ap.add_argument("--depth", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = zoo.load_yaml("sd15")
    t0 = time.perf_counter()
    bundle = zoo.build(cfg, variant="full", seed=0)
    inputs = bundle.inputs(0)
    t_build = time.perf_counter() - t0
    rss_model = peak_rss_gib()
    print(f"full SD 1.5 UNet: {sum(p.numel() for p in bundle.module.parameters()) / 1e6:.1f}M "
          f"params, latent {tuple(inputs['sample'].shape)}, {args.threads} thread(s); "
          f"build {t_build:.1f} s, peak RSS after build {rss_model:.2f} GiB")
    names = sorted({m for n in OFFICIAL_SD15 for comp in OFFICIAL_SD15[n] for m in comp})
    out_bytes = module_output_bytes(cfg, inputs, names)  # first: fails fast
    eps_bytes = inputs["sample"].numel() * 4
    t0 = time.perf_counter()
    captured = capture(bundle.module, bundle.specs, inputs, bundle.contract)
    t_capture = time.perf_counter() - t0
    costs = profile(captured, inputs, repeats=args.repeats, threads=args.threads,
                    warmup=False)
    t_cost = time.perf_counter() - t0 - t_capture
    graph = build_graph(captured, costs, "time")
    env = captured.env(inputs)
    print(f"capture {t_capture:.1f} s, cost {t_cost:.1f} s ({args.repeats} timed forward), "
          f"{graph.size} trunk nodes, {len(graph.conditioning)} conditioning nodes, "
          f"peak RSS {peak_rss_gib():.2f} GiB")
    rows = []
    for n in (2, 3, 4):
        paper = paper_splits.named(f"paper_sd15_n{n}").options
        splits = {
            "ours (balanced, time)": ("balanced", {}),
            "equal blocks": ("equal_blocks", {}),
            "paper (hand)": ("manual", dict(paper)),
        }
        for label, (strategy, options) in splits.items():
            t0 = time.perf_counter()
            ours = label.startswith("ours")  # verified as every compile is; the others are
            c = compile_graph(graph, PartitionRequest(n=n, depth=args.depth, options=options),
                              strategy=strategy, cost_model="time", name="sd15/full",
                              config_hash=bundle.architecture, inputs=inputs,
                              threads=args.threads, verify=ours)
            t_part = time.perf_counter() - t0
            if ours:
                assert c.plan.verification.startswith("exact"), c.plan.verification
                v_ms = c.plan.measured.stage_ms  # timed after verification (verify.time_step)
                print(f"N={n} planning {t_capture + t_cost + t_part:.1f} s = capture "
                      f"{t_capture:.1f} + cost {t_cost:.1f} + partition and verification "
                      f"{t_part:.1f}; {c.plan.verification}; imbalance as the plan timed it "
                      f"{max(v_ms) / statistics.mean(v_ms):.3f}", flush=True)
            ms = measured_stage_ms(c.staged, env, args.stage_repeats)
            imb = max(ms) / statistics.mean(ms)
            official = None
            if label.startswith("paper"):
                official = sum(out_bytes[m] for comp in OFFICIAL_SD15[n] for m in comp) * (n - 1) \
                    + eps_bytes * (n - 1)
            rows.append((n, label, t_part, c.plan.imbalance, imb, ms, c.plan.bytes_per_step,
                         official))
            print(f"N={n} {label:22s} partition {t_part:5.2f} s  predicted imbalance "
                  f"{c.plan.imbalance:.3f}  measured {imb:.3f}  stage ms "
                  f"{[round(x) for x in ms]}  p2p {c.plan.bytes_per_step / 2**20:.1f} MiB/step"
                  + (f"  official broadcast {official / 2**20:.1f} MiB/step "
                     f"({official / c.plan.bytes_per_step:.1f}x)" if official else ""),
                  flush=True)
    ours = [r for r in rows if r[1].startswith("ours")]
    print(f"\nplanning time (capture + cost + partition + verification), N=2..4: "
          f"{', '.join(f'{t_capture + t_cost + r[2]:.1f}' for r in ours)} s "
          f"(capture {t_capture:.1f} s and cost {t_cost:.1f} s shared); measured imbalance of "
          f"ours, conditioning included: {', '.join(f'{r[4]:.3f}' for r in ours)}; "
          f"peak RSS {peak_rss_gib():.2f} GiB (model alone {rss_model:.2f} GiB)")


if __name__ == "__main__":
    main()
