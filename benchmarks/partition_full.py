"""Benchmark: plan a full-size UNet as the command line does, then measure every split's balance.

    python benchmarks/partition_sd15.py [--ns 2 3 4] [--stage-repeats 5] [--busy]
        [--splits default flops paper] [--variant tiny]
    python benchmarks/partition_sd21.py …   python benchmarks/partition_sdxl.py …

The model is ``asyncdiff-plan model=<m> model.variant=full``'s (random weights; the batch and
latent of its config), built once. For each N it plans three splits, each from the config the
command line composes:

- **default**: the ``partition`` group's defaults (``cost_model=time``, refinement on the
  stages' measured times, local deepening): a fresh capture, one timed forward for the cost
  model, then the refinement rounds, the first of which is the verification. Its planning time
  is printed by phase, with every forward it ran;
- **flops**: ``partition.cost_model=flops`` (deterministic: no timing);
- **paper**: ``partition=paper_<m>_n<N>``, the paper's hand split.

Then, side by side in this one process, it runs each split's stages on the values a full
forward computes (each stage with the per-step conditioning it recomputes) and prints the
imbalance (slowest stage over the mean) of their *measured* times: the median of
``--stage-repeats`` runs per stage, interleaved across the splits (round-robin, so a slow
moment of the machine falls on all of them alike), by the wall clock and by the thread's CPU
time (on an idle core the two agree; the wall clock is what a GPU-less run would see).

``--busy``: a second process runs full forwards of the same model in a loop on the other core
while the splits are *planned* (started first, and planning waits until its first forward has
begun); it is stopped before the splits are measured, so every split is measured on the same
idle machine. ``--variant tiny`` runs the same on the tiny config in seconds (a smoke test).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from experiments import zoo  # noqa: E402
from experiments.cli import job_configs  # noqa: E402
from experiments.common import partition_request, plain  # noqa: E402
from partition import compile_graph  # noqa: E402
from partition.capture import capture  # noqa: E402
from partition.cost import profile, tensor_bytes  # noqa: E402
from partition.graph import build_graph  # noqa: E402
from partition.splits import names as paper_names  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# The official code's wrapped modules per component (its split tables, SD 1.5): what its
# broadcast-everything exchange sends, beside our point-to-point bytes for the same split.
OFFICIAL = {"sd15": {
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
}}


def module_output_bytes(model_cfg: dict, inputs: dict, names: list[str]) -> dict[str, int]:
    """Output bytes of each named module, from a forward on the meta device (no compute)."""
    from partition.spec import call_denoiser
    section = model_cfg["full"]
    cls = zoo.import_object(model_cfg["builder"]["cls"])
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


def config(model: str, variant: str, n: int, *extra: str) -> dict:
    """The config ``asyncdiff-plan model=<model> model.variant=<variant> parallel.n=<n> …``
    composes (the command line's own composition)."""
    cfg = job_configs([f"model={model}", f"model.variant={variant}", f"parallel.n={n}",
                       *extra], multirun=False)[0]
    return {"model": plain(cfg.model), "partition": plain(cfg.partition), "seed": int(cfg.seed)}


class Load:
    """``--busy``: full forwards of the model in a loop, in a second process on one thread."""

    def __init__(self, model: str, variant: str):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--load", model, "--variant", variant],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # its model is built: forwards from now on
        if not line.startswith("forwards"):
            raise RuntimeError(f"the load process did not start: {line!r}")
        self.started = time.perf_counter()

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        return f"load process ran {time.perf_counter() - self.started:.0f} s of forwards"


def load_forever(model: str, variant: str) -> None:
    torch.set_num_threads(1)
    bundle = zoo.build(config(model, variant, 1)["model"], seed=0)
    inputs = bundle.inputs(0)
    print("forwards", flush=True)
    from partition.spec import call_denoiser
    with torch.no_grad():
        while True:
            call_denoiser(bundle.module, inputs)


def plan_default(bundle, inputs, part: dict, n: int):
    """What ``asyncdiff-plan`` does with ``part`` (partition/graph_backend.py's compile), by
    phase: capture, cost (``repeats`` timed forwards), then cut, build, verify and refine."""
    t0 = time.perf_counter()
    captured = capture(bundle.module, bundle.specs, inputs, bundle.contract)
    t_capture = time.perf_counter() - t0
    costs = profile(captured, inputs, repeats=part["repeats"], threads=part["threads"],
                    device=part["device"])
    t_cost = time.perf_counter() - t0 - t_capture
    graph = build_graph(captured, costs, part["cost_model"])
    compiled = compile_graph(graph, partition_request(part, n), strategy=part["strategy"],
                             cost_model=part["cost_model"], name=f"{bundle.name}/full",
                             config_hash=bundle.architecture, inputs=inputs,
                             threads=part["threads"], verify=part["verify"])
    t_rounds = time.perf_counter() - t0 - t_capture - t_cost
    return compiled, captured, (t_capture, t_cost, t_rounds)


def plan_untimed(captured, bundle, inputs, part: dict, n: int):
    """A split that needs no timing (``flops``, the paper's): cut on the FLOP counts of the
    same capture; not verified here (its stages are run exactly below, on the same values)."""
    t0 = time.perf_counter()
    costs = profile(captured, inputs, repeats=0, threads=part["threads"])
    graph = build_graph(captured, costs, "flops")
    compiled = compile_graph(graph, partition_request(part, n), strategy=part["strategy"],
                             cost_model="flops", name=f"{bundle.name}/full",
                             config_hash=bundle.architecture, inputs=inputs,
                             threads=part["threads"], verify=False)
    return compiled, time.perf_counter() - t0


def stage_runs(staged, env: dict) -> list:
    """One callable per stage: the stage's segments on the values a full forward computes."""
    with torch.no_grad():
        full = staged.prepare(env)
        for seg in staged.segments:
            full.update(seg(full))

    def run(stage: int) -> None:
        local = dict(full)
        for seg in staged.stage_segments(stage):
            local.update(seg(local))
    return [lambda s=s: run(s) for s in range(staged.n)]


def measure(splits: dict[str, list], repeats: int) -> dict[str, tuple[list, list]]:
    """Median wall and thread-CPU ms of every stage of every split, over ``repeats``
    round-robin passes after one untimed run of each stage (the first stage timed must not pay
    the allocator's warm-up for all of them). Written here rather than with
    ``benchmarks.timing.median_ms`` because the runs of different splits interleave."""
    wall = {k: [[] for _ in v] for k, v in splits.items()}
    cpu = {k: [[] for _ in v] for k, v in splits.items()}
    with torch.no_grad():
        for runs in splits.values():
            for run in runs:
                run()
        for _ in range(repeats):
            for label, runs in splits.items():
                for s, run in enumerate(runs):
                    w, c = time.perf_counter(), time.thread_time()
                    run()
                    cpu[label][s].append((time.thread_time() - c) * 1e3)
                    wall[label][s].append((time.perf_counter() - w) * 1e3)
    return {k: ([statistics.median(x) for x in wall[k]], [statistics.median(x) for x in cpu[k]])
            for k in splits}


def cuts(plan) -> list[int]:
    """The trunk node indices where a new stage begins."""
    s = plan.stage_of()
    return [i for i in range(1, len(s)) if s[i] != s[i - 1]]


def imbalance(ms: list[float]) -> float:
    return max(ms) / statistics.mean(ms)


def main(model: str = "sd15") -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=model)
    ap.add_argument("--variant", default="full")
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--stage-repeats", type=int, default=5)
    ap.add_argument("--splits", nargs="+", default=["default", "flops", "paper"],
                    choices=["default", "flops", "paper"],
                    help="which splits to measure beside each other (default is always planned)")
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--load", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        return load_forever(args.load, args.variant)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base = config(args.model, args.variant, args.ns[0])
    bundle = zoo.build(base["model"], seed=base["seed"])
    inputs = bundle.inputs(base["seed"])
    params = sum(p.numel() for p in bundle.module.parameters()) / 1e6
    print(f"{args.model} {args.variant}: {params:.1f}M params, sample "
          f"{tuple(inputs['sample'].shape)}; build {time.perf_counter() - t0:.1f} s, peak RSS "
          f"{peak_rss_gib():.2f} GiB; one thread; stage times: median of "
          f"{args.stage_repeats} interleaved runs", flush=True)
    load = Load(args.model, args.variant) if args.busy else None
    if load:
        print("planning with a second process running full forwards on the other core",
              flush=True)
    try:
        planned = plan_all(args, bundle, inputs)
    finally:
        if load:
            print(load.stop(), flush=True)
    measure_all(args, planned, inputs)


def plan_all(args, bundle, inputs) -> dict[int, dict]:
    """Every N's three splits, the default one printed by phase."""
    planned: dict[int, dict] = {}
    for n in args.ns:
        part = config(args.model, args.variant, n)["partition"]
        default, captured, (t_cap, t_cost, t_rounds) = plan_default(bundle, inputs, part, n)
        m = default.plan.measured
        rounds = len(m.rounds) if m is not None and m.rounds else (1 if m else 0)
        forwards = part["repeats"] + rounds * max(part["repeats"], 1)
        print(f"N={n} default ({part['cost_model']}, repeats {part['repeats']}, refine "
              f"{part['refine']}, deepen {part['deepen']}, target {part['target']}): planning "
              f"{t_cap + t_cost + t_rounds:.1f} s = capture {t_cap:.1f} + cost {t_cost:.1f} "
              f"+ cut, build, verify and refine {t_rounds:.1f} ({rounds} round(s)); "
              f"{forwards} forwards ({part['repeats']} timed eager, {rounds} of the stages); "
              f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
        print(f"    {default.plan.verification}", flush=True)
        if m is not None:
            for i, r in enumerate(m.rounds or ()):
                print(f"    round {i + 1}: cuts {list(r.cuts)} predicted "
                      f"{imbalance(list(r.predicted_ms)):.3f} measured "
                      f"{imbalance(list(r.measured_ms)):.3f} stage ms "
                      f"{[round(x) for x in r.measured_ms]}", flush=True)
            spread = f"spread {m.spread:.1%}" if m.spread is not None else \
                "one timing per stage per round"
            print(f"    {m.outcome or ''}; {spread}", flush=True)
        splits = {"default": default} if "default" in args.splits else {}
        if "flops" in args.splits:
            splits["flops"], t_flops = plan_untimed(
                captured, bundle, inputs,
                config(args.model, args.variant, n, "partition.cost_model=flops")["partition"],
                n)
            print(f"N={n} flops: cut in {t_flops:.1f} s", flush=True)
        paper = f"paper_{args.model}_n{n}"
        if "paper" in args.splits and paper in paper_names():
            splits["paper"], _ = plan_untimed(
                captured, bundle, inputs,
                config(args.model, args.variant, n, f"partition={paper}")["partition"], n)
        planned[n] = {"splits": splits, "env": captured.env(inputs)}
    return planned


def measure_all(args, planned: dict[int, dict], inputs) -> None:
    """Every N's splits run side by side; a line per split, then the table."""
    table = []
    for n, got in planned.items():
        runs = {k: stage_runs(c.staged, got["env"]) for k, c in got["splits"].items()}
        times = measure(runs, args.stage_repeats)
        row = {}
        for label, c in got["splits"].items():
            wall, cpu = times[label]
            row[label] = (imbalance(wall), imbalance(cpu), c.plan.imbalance)
            sent = c.plan.bytes_per_step
            official = ""
            if label == "paper" and args.model in OFFICIAL and args.variant == "full":
                tables = OFFICIAL[args.model][n]
                out = module_output_bytes(zoo.load_yaml(args.model), inputs,
                                          [m for comp in tables for m in comp])
                eps = inputs["sample"].numel() * inputs["sample"].element_size()
                b = (sum(out.values()) + eps) * (n - 1)
                official = f"  official broadcast {b / 2**20:.1f} MiB/step ({b / sent:.1f}x)"
            print(f"N={n} {label:8s} predicted {c.plan.imbalance:.3f}  measured wall "
                  f"{imbalance(wall):.3f} cpu {imbalance(cpu):.3f}  stage ms wall "
                  f"{[round(x) for x in wall]} cpu {[round(x) for x in cpu]}  p2p "
                  f"{sent / 2**20:.1f} MiB/step{official}  cuts {cuts(c.plan)}", flush=True)
        table.append((n, row))
    labels = ["default", "flops", "paper"]
    print(f"\nmeasured imbalance (wall clock; predicted in brackets), {args.model} "
          f"{args.variant}{', planned under load' if args.busy else ''}:")
    print("| N | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for n, row in table:
        print(f"| {n} | " + " | ".join(
            f"{row[k][0]:.3f} ({row[k][2]:.3f})" if k in row else "-" for k in labels) + " |")
    print(f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
