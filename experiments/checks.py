"""What the schema's types cannot say: ranges, and one key against another.

Types, allowed values and unknown keys are Hydra's job (``experiments/schema.py``). This is the
rest: N >= 1, W <= T, T against the scheduler's own limit (the model's, or a pipeline
checkpoint's), guidance that can split the example batch, labels a reference model has,
the world size against the devices a split needs, a GPU that is there. Each problem is one
:class:`ConfigError` naming the key and what is allowed. Takes the plain resolved dict (no
Hydra), so it can check every job of a sweep before anything runs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from experiments.common import ConfigError, schedule_of
from experiments import zoo
from partition.spec import InputSpec, latent_name


def local_ranks(world: int, env: Mapping) -> int:
    """Ranks on this machine: torchrun's LOCAL_WORLD_SIZE, else every rank (self-spawned)."""
    return int(env.get("LOCAL_WORLD_SIZE", world))


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this system: every core
        return os.cpu_count() or 1


def oversubscription(ranks: int, threads: int, cores: int) -> str | None:
    """One line when ``ranks`` CPU workers of ``threads`` intra-op threads each need more
    cores than there are (accepted: a pipeline can be tried on a small machine)."""
    if ranks * threads <= cores:
        return None
    return (f"{ranks} ranks × {threads} thread{'s' * (threads > 1)} = {ranks * threads} threads "
            f"on {cores} core{'s' * (cores > 1)}: the ranks share the cores, so the run is "
            "slower than it would be with a core per thread and its latencies are not the "
            "pipeline's")


def check_backend(backend: str, world: int, env: Mapping) -> str:
    """``nccl`` needs one GPU per local rank; ``auto`` takes it only then (else gloo)."""
    gpus = _cuda_count()
    local = local_ranks(world, env)
    if backend == "nccl" and gpus < local:
        raise ConfigError(f"parallel.backend=nccl needs one GPU per local rank ({local} ranks, "
                          f"{gpus} GPU(s) here); allowed: gloo, auto")
    if backend == "auto":
        return "nccl" if gpus >= local else "gloo"
    return backend


def _cuda_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _int(key: str, value, low: int, high: int | None = None, why: str = "") -> int:
    if value >= low and (high is None or value <= high):
        return value
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    raise ConfigError(f"{key}={value!r}; allowed: {allowed}{why}")


def schedule(par: Mapping, steps: int | None = None):
    """The run's schedule (:class:`asyncdiff.Schedule`, which checks itself by the timeline's
    rules), and with T its timeline's too; a bad value is one ConfigError naming the key."""
    try:
        sch = schedule_of(par)
        if steps is not None:
            sch.timeline(steps)
    except ValueError as err:
        raise ConfigError(f"parallel.{err}") from None
    return sch


def guidance_scale(cfg: Mapping) -> float | None:
    """``scheduler.guidance``; for a trained reference model left at null, the model's own."""
    g = cfg["scheduler"].get("guidance")
    if g is None:
        g = (cfg["model"].get("reference") or {}).get("guidance")
    return None if g is None else float(g)


def check_steps(scheduler, steps: int, key: str = "scheduler.steps") -> None:
    """T against the scheduler's own limit (its training timesteps, and how it indexes them:
    ``schedulers.factory.steps_problem``), found by building it and running its loop."""
    from schedulers.factory import max_steps, steps_problem

    why = steps_problem(scheduler, steps)
    if why is None:
        return
    limit = max_steps(scheduler)
    if limit is not None and limit + 1 < steps and limit < scheduler.config.num_train_timesteps:
        why += f"; {steps_problem(scheduler, limit + 1)}"  # why the limit is below T_train
    allowed = f"an integer in [1, {limit}]" if limit else "fewer steps"
    raise ConfigError(f"{key}={steps}; allowed: {allowed} ({type(scheduler).__name__}: {why})")


def check_model_steps(cfg: Mapping) -> None:
    """``scheduler.steps`` against the scheduler the run builds (a trained reference model:
    with its training betas)."""
    from experiments.reference.model import scheduler_kwargs
    from schedulers import make_scheduler

    name = cfg["scheduler"]["name"]
    check_steps(make_scheduler(name, **scheduler_kwargs(cfg["model"], name)),
                cfg["scheduler"]["steps"])


def check_modes(cfg: Mapping, entry: str) -> None:
    """Where the modes run: CFG-parallel needs guidance and runs in asyncdiff-run and the
    study (a pipeline run takes it through ``asyncdiff.parallelize(pipe, cfg_parallel=True)``
    in Python); the step cache (its schedule checked by the Schedule) runs on one device, in
    the study's emulator, on the shell/core split."""
    par = cfg["parallel"]
    if par.get("cfg_parallel"):
        if cfg.get("pipeline") is not None or entry in ("bench", "demo"):
            what = f"pipeline={cfg['pipeline'].get('name')}" if cfg.get("pipeline") \
                else f"asyncdiff-{entry}"
            raise ConfigError(f"parallel.cfg_parallel=true with {what}; allowed: false (CFG-"
                              "parallel runs in asyncdiff-run model=…, the study, "
                              "asyncdiff.parallelize(pipe, cfg_parallel=True) and "
                              "benchmarks/runtime_cpu.py --configs cfg)")
        if guidance_scale(cfg) is None:
            raise ConfigError("parallel.cfg_parallel=true without guidance; allowed: a "
                              "guidance scale (scheduler.guidance=7.5), or "
                              "parallel.cfg_parallel=false")
    k = par.get("cache_interval") or 0
    if not k:
        return
    from asyncdiff.step_cache import check_split  # the runtime after the cheap checks
    try:
        check_split(cfg["partition"]["strategy"], k)
    except ValueError as err:
        raise ConfigError(f"partition.{err} (or parallel.cache_interval=0)") from None
    if entry not in ("plan", "study"):
        raise ConfigError(f"parallel.cache_interval={k}: the step cache runs on one device in "
                          "the study's emulator (a point of python -m experiments.study); "
                          f"allowed with asyncdiff-{entry}: 0")


def check_model(model: Mapping) -> str:
    """The model YAML's fields (``experiments.zoo.validate``); returns the variant."""
    try:
        return zoo.validate(dict(model))
    except ValueError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith("model") else f"model.{msg}") from None


def check_guidance(model: Mapping, variant: str, guidance) -> None:
    """CFG splits the example batch: first half uncond, second half cond (every input)."""
    if guidance is None:
        return
    if guidance < 0:
        raise ConfigError(f"scheduler.guidance={guidance!r}; allowed: null or a number >= 0")
    section = "full" if variant == "pretrained" else variant
    specs = [InputSpec.from_dict(d) for d in model[section]["inputs"]]
    latent = latent_name(specs)
    for s in specs:
        if s.role == "timestep":
            continue
        if not s.shape or s.shape[0] % 2:
            raise ConfigError(
                f"scheduler.guidance={guidance}: model {model['name']} input {s.name!r} has shape "
                f"{list(s.shape)}; allowed: null for this model (classifier-free guidance "
                f"splits the {'latent' if s.name == latent else 'conditioning'} batch, dim 0, "
                "into uncond and cond halves)")


def check_pipeline(cfg: Mapping, entry: str) -> None:
    """``pipeline=…``: asyncdiff-run only; the checkpoint, prompts and image are there."""
    from experiments.generate import check_request, checkpoint_scheduler, request

    pipe = cfg["pipeline"]
    if entry != "run":
        raise ConfigError(f"pipeline={pipe.get('name')}: asyncdiff-{entry} does not take a "
                          "pipeline; allowed: asyncdiff-run, or pipeline=null")
    for key in ("name", "cls", "path"):
        if key not in pipe:
            raise ConfigError(f"pipeline.{key}: missing; allowed: "
                              + ("the local checkpoint directory" if key == "path" else "a value"))
    if pipe["kind"] == "image" and "image" not in pipe:
        raise ConfigError("pipeline.image: missing; allowed: the conditioning image's path")
    g = cfg["scheduler"]["guidance"]
    if g is not None and g < 0:
        raise ConfigError(f"scheduler.guidance={g!r}; allowed: null or a number >= 0")
    if cfg["parallel"]["replicas"] != 1:
        raise ConfigError(f"parallel.replicas={cfg['parallel']['replicas']!r}; allowed: 1 "
                          "with a pipeline")
    cost = cfg["partition"]["cost_model"]
    if pipe.get("load", "lazy") == "lazy" and cost != "flops":
        raise ConfigError(f"partition.cost_model={cost!r} with pipeline.load=lazy; allowed: "
                          "flops (no rank holds the whole denoiser to time or trace it), or "
                          "pipeline.load=whole")
    check_request(request(cfg))
    scheduler = checkpoint_scheduler(pipe["path"])
    if scheduler is not None:
        check_steps(scheduler, cfg["scheduler"]["steps"])


def check_labels(model: Mapping, labels) -> None:
    """``labels``: class labels for a trained reference model (null: every class in turn)."""
    if labels is None:
        return
    ref = model.get("reference")
    if not isinstance(ref, Mapping):
        raise ConfigError(f"labels={labels!r}; allowed: null for model {model.get('name')} "
                          "(class labels condition trained reference models only)")
    from experiments.reference.model import reference_tokens
    classes = reference_tokens(dict(model)).null_class
    if not labels or not all(0 <= v < classes for v in labels):
        raise ConfigError(f"labels={labels!r}; allowed: null or a list of class labels in "
                          f"[0, {classes - 1}]")


def resolved(cfg, entry: str = "run", env: Mapping[str, str] | None = None):
    """The composed config, checked and resolved once to plain data (enums as their names),
    as every entry point uses it (STYLE 5: resolve the config once, before workers start)."""
    from omegaconf import OmegaConf

    from experiments.common import plain
    data = plain(cfg)
    check_config(data, env, entry)
    return OmegaConf.create(data)


def _cuda_available() -> bool:
    import torch  # only here: the check runs before the heavy imports
    return torch.cuda.is_available()


def check_config(cfg: Mapping, env: Mapping[str, str] | None = None, entry: str = "run") -> None:
    """Check what an entry point will use; raise ConfigError on the first problem.

    ``env``: the process environment (``RANK``/``WORLD_SIZE`` under torchrun).
    ``entry``: ``plan`` checks what planning needs; ``run``/``bench``/``demo``/``study`` all.
    """
    import schedulers

    env = os.environ if env is None else env
    model = cfg["model"]
    variant = check_model(model)
    part, par, sch = cfg["partition"], cfg["parallel"], cfg["scheduler"]
    _int("partition.repeats", part["repeats"], 0)
    _int("partition.deepen", part["deepen"], 0)
    _int("partition.refine", part["refine"], 0)
    if not part["target"] >= 1:
        raise ConfigError(f"partition.target={part['target']}; allowed: a number >= 1 (the "
                          "slowest stage over the mean)")
    if part["depth"] is not None:
        _int("partition.depth", part["depth"], 0)
    if part["threads"] is not None:
        _int("partition.threads", part["threads"], 1)
    if part["device"] == "cuda" and not _cuda_available():
        raise ConfigError("partition.device=cuda: no CUDA device here; allowed: cpu")
    _int("parallel.threads", par["threads"], 1)
    if sch["name"] not in schedulers.SCHEDULERS:
        raise ConfigError(f"scheduler.name={sch['name']!r}; allowed: "
                          f"{', '.join(schedulers.SCHEDULERS)}")
    steps = _int("scheduler.steps", sch["steps"], 1)
    run = schedule(par, steps)
    if cfg.get("pipeline") is not None:
        check_pipeline(cfg, entry)
    else:
        check_guidance(model, variant, sch["guidance"])
    check_modes(cfg, entry)
    _int("seed", cfg["seed"], 0)
    if cfg["batch"] is not None:
        _int("batch", cfg["batch"], 1)
    check_labels(model, cfg["labels"])
    if cfg.get("pipeline") is None:  # a pipeline's scheduler is its checkpoint's: check_pipeline
        check_model_steps(cfg)
    if entry == "plan":
        return
    _int("bench.repeats", cfg["bench"]["repeats"], 1)
    _int("bench.warmup_runs", cfg["bench"]["warmup_runs"], 0)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        if world != run.world_size():
            raise ConfigError(
                f"WORLD_SIZE={world} (torchrun --nproc-per-node × nodes); allowed: "
                f"parallel.replicas × groups × devices = {run.replicas} × {run.groups} × "
                f"{run.devices} = {run.world_size()} ({run.describe()})")
    for key in ("step_timeout_s", "run_timeout_s", "startup_timeout_s"):
        value = par.get(key)
        if value is not None and not value > 0:
            raise ConfigError(f"parallel.{key}={value!r}; allowed: a number of seconds > 0, or "
                              "null (derived from the plan)")
    check_backend(par["backend"], run.world_size(), env)
