"""``asyncdiff-run pipeline=…``: prompts to decoded images, sequential and asynchronous.

    asyncdiff-run pipeline=sd15 pipeline.path=/ckpt/sd15 parallel.n=3 parallel.warmup=3
    asyncdiff-run -m pipeline=sdxl pipeline.path=… parallel.n=2,3,4 parallel.stride=1,2
    torchrun --nproc-per-node=3 -m experiments.run pipeline=sd15 pipeline.path=… parallel.n=3

Every rank of the asynchronous pipeline (self-spawned here, or started by torchrun) loads the
checkpoint (``pipeline.load=lazy``, the default: the denoiser on the meta device, each rank
reading only its own stage's weights; ``asyncdiff/dropin/lazy.py``), runs
``asyncdiff.parallelize(pipe, mode="distributed")`` with the run's split and timeline, and
makes the same pipeline calls from the same seeds (SPMD): the pipeline's own text encoders,
guidance, scheduler and VAE run unchanged on every rank, the denoiser as the N-stage
pipeline. The plain pipeline makes the same calls in one process (the sequential baseline;
self-spawned, first, its step time sizing the ranks' time limits; under torchrun, on rank 0
after the ranks are done; never sharing the cores with them). Both decode through the VAE;
the run directory gets:

    config.yaml, plan.json, plan.txt   the resolved config; the denoiser's plan (rank 0's)
    images/sequential/NNN.png|.gif     one per item (prompt × seed); GIF for video
    images/asyncdiff/NNN.png|.gif
    images/grid.png                    per item: sequential | asyncdiff | |difference| × 4
    metrics.json                       latency, speedup, pixel PSNR/SSIM against sequential,
                                       LPIPS / CLIP score (or "skipped: <reason>"), peak RSS

and a W&B run (config, plan, metrics, images). ``pipeline.warm_call`` (default true) makes
one untimed call of the first item first, in both: the asynchronous pipeline's first call
captures, plans and verifies the denoiser (``first_call_s`` records it). The log says first
which generations the run makes (four, or two without the warm-up calls) and names each as
it starts; the pipeline's own progress bar, named the same, is drawn on a terminal only.
"""
from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from asyncdiff.distributed import limits, liveness
from asyncdiff.distributed.launch import Task, from_bytes, run_ranks, to_bytes
from asyncdiff.distributed.limits import STARTUP_S
from asyncdiff.distributed.worker import init_group
from experiments.build import warn_oversubscribed
from experiments.common import ConfigError, plain, schedule_of
from experiments.generate import Request, check_request, generate, load, request
from experiments.pipeline_record import finish_pipeline
from partition.threads import intra_op_threads

log = logging.getLogger(__name__)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's, on the console

def dropin_options(cfg: dict) -> dict:
    """``asyncdiff.parallelize``'s keyword arguments from ``parallel`` and ``partition``."""
    par, part = cfg["parallel"], cfg["partition"]
    for key in ("shell_depth", "shell_slack", "memory_cap_mb"):
        if part.get(key) is not None:
            raise ConfigError(f"partition.{key}={part[key]!r}: not taken by a pipeline run; "
                              "allowed: null (split with partition.strategy, boundaries, "
                              "stages)")
    manual = {k: part[k] for k in ("boundaries", "stages") if part.get(k) is not None}
    return dict(n=par["n"], stride=par["stride"], warmup=par["warmup"],
                step_timeout_s=par.get("step_timeout_s"),
                cooldown=par.get("cooldown", 0), sync=tuple(par.get("sync") or ()),
                time_shift=bool(par["time_shift"]),
                stride_noise=par["stride_noise"],
                strategy=None if manual else part["strategy"], cost_model=part["cost_model"],
                depth=part["depth"], verify=bool(part["verify"]), backend=part["backend"],
                **manual)


def under_torchrun() -> bool:
    """Started by torchrun (every rank runs the asynchronous pipeline first), or self-spawned
    (the plain pipeline first: its step time sizes the ranks' time limits)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def generations(cfg: dict, torchrun: bool) -> list[str]:
    """The run's generations, in order: for each of the plain pipeline and the asynchronous
    one, the warm-up call (``pipeline.warm_call``: the first item, untimed) and the timed
    call of every item."""
    order = ("asyncdiff", "plain pipeline") if torchrun else ("plain pipeline", "asyncdiff")
    calls = ("warm-up call", "timed call") if cfg["pipeline"]["warm_call"] else ("timed call",)
    return [f"{who}, {call}" for who in order for call in calls]


def announce(cfg: dict, torchrun: bool) -> None:
    """One log line: what the run is about to do, generation by generation."""
    req, names = request(cfg), generations(cfg, torchrun)
    size = f"{req.height}×{req.width}" if req.height and req.width else "the pipeline's size"
    what = {"plain pipeline, warm-up call": "the first item, untimed",
            "asyncdiff, warm-up call": "the first item, untimed; captures, plans and "
                                       "verifies the denoiser",
            "plain pipeline, timed call": f"{len(req.items)} item(s)",
            "asyncdiff, timed call": f"{len(req.items)} item(s)"}
    if len(names) == 2:  # no warm-up: the planning is timed with the first item
        what["asyncdiff, timed call"] += "; the first captures, plans and verifies the " \
                                         "denoiser, inside the timing"
    steps = [f"{i}. {n} ({what[n]})" for i, n in enumerate(names, 1)]
    log.info("pipeline run: %d generations of %s at %s, %d steps each: %s%s", len(names),
             req.cls, size, req.steps, "; ".join(steps),
             ". pipeline.warm_call=false skips the warm-up calls" if len(names) == 4 else "")


def _timed(pipe, req: Request, warm: bool, who: str, torchrun: bool, cfg: dict,
           report: bool = True) -> tuple[torch.Tensor, list[float], float | None]:
    """The warm-up call (if ``warm``) and the timed call of the pipeline ``who`` is; where
    ``report``, each is named in the log and (``progress``) on its bar, on a terminal."""
    names = generations(cfg, torchrun)
    label = {n: f"{i}/{len(names)} {n}" for i, n in enumerate(names, 1)}
    say = log.info if report else (lambda *a: None)
    bar = report and bool(cfg.get("progress", True))
    first = None
    if warm:
        one = Request(**{**vars(req), "prompts": req.prompts[:1], "seeds": req.seeds[:1]})
        say("generation %s: 1 item × %d steps", label[f"{who}, warm-up call"], req.steps)
        first = sum(generate(pipe, one, label[f"{who}, warm-up call"], bar)[1])
    say("generation %s: %d item(s) × %d steps", label[f"{who}, timed call"], len(req.items),
        req.steps)
    images, seconds = generate(pipe, req, label[f"{who}, timed call"], bar)
    return images, seconds, first


def rank_task(rank: int, world: int, cfg: dict) -> tuple[bytes | None, dict]:
    """What every rank runs inside the group: the parallelized pipeline's images (rank 0
    returns them and the plans) and this rank's call times."""
    import asyncdiff

    if rank == 0 and not logging.getLogger().handlers:
        # a spawned rank: Hydra set up logging in the parent only; rank 0 names its
        # generations on the console as the parent would
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    req = request(cfg)
    if rank == 0:
        log.info("rank 0 of %d: loading %s from %s (%s)", world, req.cls, req.path,
                 "each rank its own stage of the denoiser" if req.load == "lazy" else "whole")
    with intra_op_threads(cfg["parallel"]["threads"]):
        pipe = load(req, lazy=req.load == "lazy")
        handle = asyncdiff.parallelize(pipe, mode="distributed", offload="drop",
                                       **dropin_options(cfg))
        images, seconds, first = _timed(pipe, req, bool(cfg["pipeline"]["warm_call"]),
                                        "asyncdiff", under_torchrun(), cfg, report=rank == 0)
    plans = [s.plan.to_json() for s in handle.sessions.values()]
    extra = {"seconds": seconds, "first_call_s": first, "plans": plans if rank == 0 else None}
    return (to_bytes(images) if rank == 0 else None), extra


def sequential(cfg: dict) -> tuple[torch.Tensor, list[float], float | None, str]:
    """The plain pipeline's images from the same seeds, and its scheduler's class."""
    req = request(cfg)
    log.info("loading %s from %s", req.cls, req.path)
    with intra_op_threads(cfg["parallel"]["threads"]):
        pipe = load(req)
        images, seconds, first = _timed(pipe, req, bool(cfg["pipeline"]["warm_call"]),
                                        "plain pipeline", under_torchrun(), cfg)
    return images, seconds, first, type(pipe.scheduler).__name__


def _limits(cfg: dict, step_estimate_s: float) -> tuple[float, float]:
    """(per wait, whole run) in seconds: ``parallel.*_timeout_s`` where set, else derived
    from one step of the plain pipeline timed before the ranks start
    (:func:`asyncdiff.distributed.limits.from_estimate`)."""
    par = cfg["parallel"]
    steps = (len(request(cfg).items) + bool(cfg["pipeline"]["warm_call"])) * \
        cfg["scheduler"]["steps"]
    lim = limits.from_estimate(step_estimate_s, steps, step_s=par.get("step_timeout_s"),
                               run_s=par.get("run_timeout_s"),
                               startup_s=par.get("startup_timeout_s"))
    log.info("pipeline run %s", lim.describe())
    return lim.step_s, lim.run_s


def run_pipeline_spawn(cfg: DictConfig, out: Path) -> dict:
    """The ranks spawned here (``asyncdiff.distributed.launch.run_ranks``); this process records."""
    from experiments.checks import check_backend

    data = plain(cfg)
    check_request(request(data))
    par = data["parallel"]
    world = schedule_of(par).world_size()
    announce(data, torchrun=False)
    base = sequential(data)  # first: its step time sizes the ranks' time limits
    steps = len(base[1]) * data["scheduler"]["steps"]
    step_s, run_s = _limits(data, sum(base[1]) / steps if steps else 0.0)
    backend = check_backend(par["backend"], world, os.environ)
    names = generations(data, torchrun=False)
    ours = [f"{i}/{len(names)}" for i, n in enumerate(names, 1) if n.startswith("asyncdiff")]
    log.info("asyncdiff: %s from %s on %d ranks (each loads %s): generation %s; rank 0 names "
             "them", data["pipeline"]["cls"], data["pipeline"]["path"], world,
             "its own stage" if data["pipeline"].get("load", "lazy") == "lazy" else "it whole",
             " and ".join(ours))
    warn_oversubscribed(backend, world, par["threads"])
    data = {**data, "parallel": {**par, "step_timeout_s": step_s}}  # the loop's, measured
    done = run_ranks(Task(rank_task, data, backend, par.get("startup_timeout_s") or STARTUP_S),
                     world, run_s)
    images = from_bytes(done[0].payload)
    ranks = {r: {"seconds": d.extra["seconds"], "peak_rss": d.peak_rss} for r, d in done.items()}
    return finish_pipeline(cfg, out, images, done[0].extra, ranks, base)


def run_pipeline_torchrun(cfg: DictConfig, out: Path) -> None:
    """Every rank (torchrun) runs :func:`rank_task`; rank 0 then runs the baseline and
    records."""
    from experiments.checks import check_backend, local_ranks

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    data = plain(cfg)
    check_request(request(data))
    if rank == 0:
        announce(data, torchrun=True)
    # the loop's step limit: configured, else derived from the plan the drop-in makes
    startup = data["parallel"].get("startup_timeout_s") or STARTUP_S
    backend = check_backend(data["parallel"]["backend"], world, os.environ)
    if rank == 0:
        warn_oversubscribed(backend, local_ranks(world, os.environ),
                            data["parallel"]["threads"])
    init_group(rank, world, backend, None, startup)  # and this rank's liveness
    payload, extra = rank_task(rank, world, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gathered = [json.loads(g) for g in liveness.exchange(
        "the end", json.dumps({"seconds": extra["seconds"], "peak_rss": peak}))]
    liveness.stop()
    dist.destroy_process_group()
    if rank == 0:
        images = from_bytes(payload)
        finish_pipeline(cfg, out, images, extra, dict(enumerate(gathered)), sequential(data))


__all__ = ["run_pipeline_spawn", "run_pipeline_torchrun", "rank_task", "dropin_options"]
