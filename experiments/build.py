"""From a resolved config to what a run needs: the compiled model, the parallel spec, the
sampling jobs, and the sequential baseline.

Shared by ``asyncdiff-run``, ``asyncdiff-bench`` and the demo (STYLE 6). The model's build,
capture and per-node costs are cached per process, keyed by what determines them, so the
jobs of a sweep (basic launcher: one process) capture each model once and only re-plan.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from asyncdiff.denoiser import SequentialDenoiser
from asyncdiff.guidance import GuidanceSplit
from asyncdiff.distributed import limits
from asyncdiff.distributed.limits import Limits
from asyncdiff.distributed.worker import SamplingJob
from asyncdiff.schedule import Schedule
from experiments.checks import (check_backend, guidance_scale, local_ranks,
                                oversubscription, usable_cores)
from experiments.common import partition_request, plain, requested
from experiments.reference.model import (conditioning, is_reference, reference_tokens,
                                         scheduler_kwargs)
from partition import Compiled, Plan, capture_or_fallback, compile_graph, compile_model
from experiments import zoo
from partition.capture import capture
from partition.cost import profile
from partition.graph import build_graph
from partition.threads import intra_op_threads
from experiments.zoo import ModelBundle
from schedulers import make_scheduler, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workers:
    """How the ranks of a run are started: intra-op threads each, the backend, the waits."""

    threads: int
    backend: str
    limits: Limits


def workers(par: dict, schedule: Schedule, plan: Plan | None = None, steps: int | None = None,
            quiet: bool = False) -> Workers:
    """The ``parallel`` settings that are not the schedule; with the plan and T, the time
    limits (configured, or derived from the planned step time: limits.py)."""
    backend = check_backend(par["backend"], schedule.world_size(), os.environ)
    if plan is None:
        lim = Limits(startup_s=par.get("startup_timeout_s") or limits.STARTUP_S)
    else:
        if steps is None:
            raise ValueError("workers: the time limits need T (steps) with the plan")
        lim = limits.derive(plan, steps, step_s=par.get("step_timeout_s"),
                            run_s=par.get("run_timeout_s"),
                            startup_s=par.get("startup_timeout_s"))
        if not quiet:
            log.info("%s", lim.describe())
            warn_oversubscribed(backend, local_ranks(schedule.world_size(), os.environ),
                                par["threads"])
    return Workers(par["threads"], backend, lim)


def warn_oversubscribed(backend: str, ranks: int, threads: int) -> None:
    """The one-line warning of :func:`experiments.checks.oversubscription` for CPU ranks
    (gloo; under nccl each rank computes on its own GPU)."""
    said = oversubscription(ranks, threads, usable_cores()) if backend == "gloo" else None
    if said:
        log.warning("%s", said)


def _halves(example: dict[str, torch.Tensor], names: list[str]) -> tuple[dict, dict]:
    """Classifier-free guidance from the model's example batch: first half of dim 0 is the
    unconditional input, second half the conditional one (the order diffusers pipelines
    concatenate them in, and the order ``schedulers.sample`` puts them back)."""
    uncond, cond = {}, {}
    for name in names:
        v = example[name]
        half = v.shape[0] // 2
        uncond[name], cond[name] = v[:half], v[half:]
    return cond, uncond


def model_config(cfg: DictConfig) -> dict:
    """The model YAML of ``cfg`` with ``batch`` applied: ``batch`` images per pipeline means
    every input whose dim 0 is the example batch gets dim 0 = ``batch`` (2·``batch`` under
    classifier-free guidance: [uncond, cond]). The plan is captured for that shape. With
    CFG-parallel each guidance half is its own batch: the plan is captured for ``batch`` rows
    (null: half the example batch)."""
    model_cfg = plain(cfg.model)
    batch = cfg.get("batch")
    halves = bool(cfg.parallel.get("cfg_parallel")) and guidance_of(cfg) is not None
    if batch is None and not halves:
        return model_cfg
    variant = model_cfg.get("variant", "tiny")
    inputs = model_cfg[variant]["inputs"]
    latent = next(d for d in inputs if d.get("role") == "latent")
    rows = latent["shape"][0]
    if batch is None:
        batch = rows // 2
    new = int(batch) * (1 if guidance_of(cfg) is None or halves else 2)
    model_cfg[variant]["inputs"] = [
        {**d, "shape": [new, *d["shape"][1:]]} if d.get("shape") and d["shape"][0] == rows
        else d for d in inputs]
    return model_cfg


UNCOND_DRAW = 1 << 20  # CFG-parallel's second example draw: no replica's first draw


def guidance_of(cfg: DictConfig) -> float | None:
    """``scheduler.guidance``; for a trained reference model left at null, the model's own."""
    return guidance_scale({"scheduler": plain(cfg.scheduler), "model": plain(cfg.model)})


def job_labels(cfg: DictConfig, replica: int, batch: int, classes: int) -> torch.Tensor:
    """Class labels of a reference model's pipeline ``replica``: ``labels`` if given (cycled),
    else ``seed + i`` mod classes over the run's images, so a grid shows every class."""
    given = cfg.get("labels")
    start = replica * batch
    if given:
        return torch.tensor([int(given[(start + i) % len(given)]) for i in range(batch)])
    return (torch.arange(start, start + batch) + int(cfg.seed)) % classes


def sampling_jobs(bundle: ModelBundle, cfg: DictConfig, replicas: int) -> list[SamplingJob]:
    """One job per replica: replica r uses seed + r for its noise and conditioning.

    With guidance (``scheduler.guidance``, or a reference model's own), the latent batch is
    half the example's and each step runs the [uncond, cond] batch (the example's shape,
    which the plan was captured for). With CFG-parallel the plan is one half's: a model
    without class tokens takes its cond from draw seed + r and its uncond from draw
    seed + r + UNCOND_DRAW. A model YAML's ``schedule`` block (the training betas)
    and its ``scheduler_options`` for this scheduler go to the scheduler. A trained reference model is conditioned on its class tokens
    (:func:`job_labels`), otherwise on the example batch's conditioning.
    """
    jobs = []
    guidance = guidance_of(cfg)
    halves = guidance is not None and bool(cfg.parallel.get("cfg_parallel"))
    model_cfg = plain(cfg.model)
    schedule = scheduler_kwargs(model_cfg, cfg.scheduler.name)
    cond_names = [s.name for s in bundle.specs if s.role == "cond"]
    tokens = reference_tokens(model_cfg) if is_reference(model_cfg) else None
    for r in range(replicas):
        example = bundle.inputs(cfg.seed + r)
        if halves:  # the plan's batch is one guidance half: uncond and cond from two draws
            other = bundle.inputs(cfg.seed + r + UNCOND_DRAW)
            example = {k: torch.cat([other[k], v]) if k in [bundle.latent, *cond_names] else v
                       for k, v in example.items()}
        shape = list(example[bundle.latent].shape)
        uncond = None
        if guidance is not None:
            shape[0] //= 2
        if tokens is not None:
            cond, uncond = conditioning(tokens, job_labels(cfg, r, shape[0], tokens.null_class))
            uncond = None if guidance is None else uncond
        elif guidance is None:
            cond = {n: example[n] for n in cond_names}
        else:
            cond, uncond = _halves(example, cond_names)
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + r))
        jobs.append(SamplingJob(cfg.scheduler.name, cfg.scheduler.steps, x_T, cond,
                                guidance=guidance, uncond=uncond, scheduler_kwargs=schedule))
    return jobs


@lru_cache(maxsize=2)
def _captured(model_json: str, seed: int, cost_model: str, repeats: int, threads, device,
              backend: str):
    """Build, capture and cost a model once per process (a sweep re-plans on it); ``None``
    for the capture, and why, when it is the module backend's (asked for, or torch.export
    cannot capture it and the backend may fall back: ``partition.capture_or_fallback``)."""
    model_cfg = json.loads(model_json)
    bundle = zoo.build(model_cfg, seed=seed)
    inputs = bundle.inputs(seed)
    with torch.no_grad():
        captured, why = capture_or_fallback(
            lambda: capture(bundle.module, bundle.specs, inputs, bundle.contract), backend)
        if captured is None:
            return bundle, inputs, None, None, why
        fv = bundle.module if cost_model == "fvcore" else None
        costs = profile(captured, inputs, repeats=repeats if cost_model == "time" else 0,
                        threads=threads, fvcore_model=fv, device=device)
    return bundle, inputs, captured, costs, ""


def compiled_model(cfg: DictConfig) -> tuple[ModelBundle, Compiled]:
    """Build, capture, cost (cached), plan and verify the model ``cfg`` describes."""
    model_cfg, part, par = model_config(cfg), plain(cfg.partition), plain(cfg.parallel)
    log.info("planning %s/%s into N=%d stages: build, capture, %s costs, %s split%s",
             model_cfg["name"], model_cfg.get("variant", "tiny"), par["n"],
             part["cost_model"], part["strategy"],
             ", verify against the whole model" if part.get("verify", True) else "")
    t0 = time.perf_counter()
    hit = _captured.cache_info().hits
    backend = part.get("backend", "auto")
    bundle, inputs, captured, costs, why = _captured(
        json.dumps(model_cfg, sort_keys=True), int(cfg.seed), part["cost_model"],
        int(part.get("repeats", 1)), part.get("threads"), part.get("device"), backend)
    cached = _captured.cache_info().hits > hit
    request = partition_request(part, par["n"])
    name = f"{bundle.name}/{bundle.variant}"
    verify = bool(part.get("verify", True))
    with torch.no_grad(), requested():
        if captured is None:  # the module backend (asked for, or capture failed)
            compiled = compile_model(bundle.module, bundle.specs, inputs, request,
                                     strategy=part["strategy"], cost_model=part["cost_model"],
                                     name=name, config_hash=bundle.architecture,
                                     repeats=int(part.get("repeats", 1)),
                                     threads=part.get("threads"), contract=bundle.contract,
                                     verify=verify, backend="module", note=why)
        else:
            graph = build_graph(captured, costs, part["cost_model"])
            compiled = compile_graph(graph, request, strategy=part["strategy"],
                                     cost_model=part["cost_model"], name=name,
                                     config_hash=bundle.architecture, inputs=inputs,
                                     threads=part.get("threads"), verify=verify)
    log.info("planned %s into N=%d stages (%s backend) in %.1f s%s; %s", name,
             compiled.plan.n, compiled.plan.backend, time.perf_counter() - t0,
             " (capture reused)" if cached else "", compiled.plan.verification)
    return bundle, compiled


def step_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar over sampling steps; silent when not on a terminal (``disable=None``)."""
    return tqdm(total=total, desc=desc, unit="step", leave=False,
                disable=None if enabled else True)


def sequential_sample(staged, job: SamplingJob, threads: int, progress: bool = True,
                      cfg_parallel: bool = False) -> tuple[torch.Tensor, float]:
    """The sequential sampler (whole model every step) on ``threads`` threads: latent, seconds.
    ``cfg_parallel``: one call per guidance half (what CFG-parallel equals bit for bit; the
    plan is captured for one half)."""
    with intra_op_threads(threads), step_bar(job.steps, f"sequential ({threads} thr)",
                                              progress) as bar:
        t0 = time.perf_counter()
        scheduler = make_scheduler(job.scheduler, **job.scheduler_kwargs)
        denoiser = GuidanceSplit([SequentialDenoiser(staged)] * 2) if cfg_parallel \
            else SequentialDenoiser(staged)
        out = sample(denoiser, scheduler, job.x_T, job.cond, steps=job.steps,
                     guidance_scale=job.guidance, uncond=job.uncond,
                     callback=lambda info: bar.update(1))
        return out, time.perf_counter() - t0
