"""asyncdiff-bench: latency of the sequential sampler on 1 and on P threads against the
asynchronous pipeline of P = N−1+S workers (one thread each), repeated.

    asyncdiff-bench model=sd15 parallel.n=2 bench.repeats=5
    asyncdiff-bench -m parallel.n=2,3,4                 # one bench per N (sweep directory)

P threads is what a CPU user would otherwise do with the same cores; on GPUs the P-thread
row is still the one-process baseline. Writes into the run directory:

    bench.csv    one row per timed run: mode, threads, repeat, latency_s
    bench.json   the rows, a summary per mode (median, mean, min, max, std), the speedups of
                 the pipeline's median over each sequential median, the plan's prediction
                 (partition/report.py: predict), and the config
    metrics.json the medians as one flat row (what a ``-m`` sweep's results table reads)
    plan.json, plan.txt, config.yaml

The pipeline's latency is the launcher's ``wall_s``: from the first step to the last result,
excluding worker start-up (process spawn, unpickling the stages); ``end_to_end_s`` includes it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm.auto import tqdm

from asyncdiff.distributed.launch import launch
from experiments import atomic
from experiments import metrics as M
from experiments.build import compiled_model, sampling_jobs, sequential_sample, workers
from experiments.cli import checked
from experiments.common import (CONF_DIR, exit_on_bad_input, parallel_rounds, plain,
                                schedule_of, sequential_rounds)
from experiments.record import identity, write_json
from experiments.run import save_plan
from experiments.checks import resolved
from experiments.wandb_log import RunLogger
from partition.report import predict

log = logging.getLogger(__name__)


def bench(cfg: DictConfig, out: Path) -> dict:
    """Time each mode ``bench.repeats`` times (interleaved, so drifting machine load hits
    every mode alike); write bench.csv and bench.json; return the JSON's content."""
    bundle, compiled = compiled_model(cfg)
    sch = schedule_of({**plain(cfg.parallel), "replicas": 1})
    par = workers(plain(cfg.parallel), sch, compiled.plan, cfg.scheduler.steps)
    save_plan(cfg, out, compiled.plan)
    job = sampling_jobs(bundle, cfg, 1)[0]
    p = sch.devices
    for _ in range(cfg.bench.warmup_runs):
        sequential_sample(compiled.staged, job, 1, progress=False)
    rows = []
    for i in tqdm(range(cfg.bench.repeats), desc="bench", unit="repeat",
                  disable=None if cfg.progress else True):
        for threads in (1, p):
            _, t = sequential_sample(compiled.staged, job, threads, cfg.progress)
            rows.append({"mode": "sequential", "threads": threads, "workers": 1, "repeat": i,
                         "latency_s": t, "end_to_end_s": t})
        t0 = time.perf_counter()
        result = launch(compiled.staged, compiled.plan, sch, [job], threads=par.threads,
                        backend=par.backend, limits=par.limits)
        rows.append({"mode": "asyncdiff", "threads": par.threads, "workers": p, "repeat": i,
                     "latency_s": result.wall_s, "end_to_end_s": time.perf_counter() - t0})
    groups = {"sequential_1": [r for r in rows if r["mode"] == "sequential" and r["threads"] == 1],
              f"sequential_{p}": [r for r in rows if r["mode"] == "sequential"
                                  and r["threads"] == p],
              "asyncdiff": [r for r in rows if r["mode"] == "asyncdiff"]}
    summary = {k: M.latency_summary([r["latency_s"] for r in v]) for k, v in groups.items()}
    ours = summary["asyncdiff"]["median_s"]
    report = {
        **identity(plain(cfg)), "devices": p,
        "speedup_vs_1_thread": M.speedup(summary["sequential_1"]["median_s"], ours),
        f"speedup_vs_{p}_threads": M.speedup(summary[f"sequential_{p}"]["median_s"], ours),
        "predicted": predict(compiled.plan, cfg.scheduler.steps,
                             sequential_rounds(sch, cfg.scheduler.steps), sch.stride,
                             parallel_rounds(sch, cfg.scheduler.steps)),
        "summary": summary, "rows": rows, "plan_hash": compiled.plan.plan_hash,
    }
    atomic.write_csv(out / "bench.csv", rows, list(rows[0]))
    write_json(out / "bench.json", report)
    # the row a sweep's results table reads (experiments/sweep.py); no quality numbers here
    write_json(out / "metrics.json", {
        **identity(plain(cfg)), "devices": p, "latency_s": ours,
        "sequential_s": summary["sequential_1"]["median_s"],
        f"sequential_{p}_threads_s": summary[f"sequential_{p}"]["median_s"],
        "speedup": report["speedup_vs_1_thread"],
        "predicted_speedup": report["predicted"]["speedup"], "plan_hash": report["plan_hash"]})
    log.info("bench (median of %d): sequential 1 thread %.3f s, %d threads %.3f s, asyncdiff "
             "%.3f s -> %.2fx / %.2fx; predicted %.2fx; %s", cfg.bench.repeats,
             summary["sequential_1"]["median_s"], p, summary[f"sequential_{p}"]["median_s"],
             ours, report["speedup_vs_1_thread"], report[f"speedup_vs_{p}_threads"],
             report["predicted"]["speedup"], out)
    logger = RunLogger(plain(cfg.wandb), plain(cfg), out, job_type="bench",
                       name=f"bench-{cfg.model.name}-N{sch.n}S{sch.stride}W{sch.warmup}")
    logger.plan(compiled.plan)
    logger.table("bench", rows)
    logger.metrics({k: v for k, v in report.items() if isinstance(v, (int, float))}
                   | {f"{k}/median_s": s["median_s"] for k, s in summary.items()})
    logger.finish()
    return report


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@exit_on_bad_input
def hydra_main(cfg: DictConfig) -> None:
    cfg = resolved(cfg, "bench")
    bench(cfg, Path(HydraConfig.get().runtime.output_dir))


main = checked(hydra_main, "bench")  # the console script is experiments.cli.bench_main

if __name__ == "__main__":
    main()
