"""One place that checks a resolved config before anything runs or is written.

Every problem is a :class:`experiments.common.ConfigError` with one line naming the key and
the allowed values; the entry points turn it into exit code 2 (``experiments/cli.py``).
Takes the plain resolved dict (no Hydra), so it can run on each job of a sweep up front.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from experiments.common import CONF_DIR, ConfigError
from partition import zoo
from partition.spec import InputSpec, latent_name

WANDB_MODES: tuple[str, ...] = ("offline", "online", "disabled")
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")
PROFILE_DEVICES: tuple[str, ...] = ("cpu", "cuda")  # where cost_model=time times the nodes
STRIDE_NOISE: tuple[str, ...] = ("fresh", "reuse")


def scheduler_names() -> list[str]:
    """The schedulers the experiments offer: one ``conf/scheduler/<name>.yaml`` each (a test
    checks they are exactly ``schedulers.SCHEDULERS``; reading the files keeps diffusers out
    of the up-front check)."""
    import yaml

    names = []
    for p in sorted(Path(CONF_DIR, "scheduler").glob("*.yaml")):
        names.append(str((yaml.safe_load(p.read_text()) or {}).get("name", p.stem)))
    return names


def _int(key: str, value, low: int, high: int | None = None, why: str = "") -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= low and (high is None or value <= high):
            return value
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    raise ConfigError(f"{key}={value!r}; allowed: {allowed}{why}")


def _cuda_available() -> bool:
    import torch  # only here: validation runs before the heavy imports
    return torch.cuda.is_available()


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}; allowed: {', '.join(map(str, allowed))}")


def _section(cfg: Mapping, key: str) -> Mapping:
    value = cfg.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: missing or not a mapping")
    return value


def devices(par: Mapping) -> int:
    """Workers per pipeline: N−1+S (``stride_noise: fresh``) or N (``reuse``)."""
    return par["n"] - 1 + par["stride"] if par["stride_noise"] == "fresh" else par["n"]


def validate_model(model: Mapping) -> str:
    """The model YAML's fields (``partition.zoo.validate``); returns the variant."""
    try:
        return zoo.validate(dict(model))
    except ValueError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith("model") else f"model.{msg}") from None


def validate_guidance(model: Mapping, variant: str, guidance) -> None:
    """CFG splits the example batch: first half uncond, second half cond (every input)."""
    if guidance is None:
        return
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
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


def validate_labels(model: Mapping, labels) -> None:
    """``labels``: class labels for a trained reference model (null: every class in turn)."""
    if labels is None:
        return
    ref = model.get("reference")
    if not isinstance(ref, Mapping):
        raise ConfigError(f"labels={labels!r}; allowed: null for model {model.get('name')} "
                          "(class labels condition trained reference models only)")
    from experiments.reference.model import reference_tokens
    classes = reference_tokens(dict(model)).null_class
    if (not isinstance(labels, (list, tuple)) or not labels
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < classes
                       for v in labels)):
        raise ConfigError(f"labels={labels!r}; allowed: null or a list of class labels in "
                          f"[0, {classes - 1}]")


def validate_config(cfg: Mapping, env: Mapping[str, str] | None = None,
                    entry: str = "run") -> None:
    """Check everything an entry point will use; raise ConfigError on the first problem.

    ``env``: the process environment (``RANK``/``WORLD_SIZE`` under torchrun).
    ``entry``: ``plan`` checks what planning needs; ``run``/``bench``/``demo`` everything.
    """
    env = os.environ if env is None else env
    from partition import COST_MODELS, STRATEGIES

    model = _section(cfg, "model")
    variant = validate_model(model)
    part = _section(cfg, "partition")
    _choice("partition.strategy", part.get("strategy"), tuple(STRATEGIES))
    _choice("partition.cost_model", part.get("cost_model"), COST_MODELS)
    _int("partition.repeats", part.get("repeats", 3), 0)
    if part.get("depth") is not None:
        _int("partition.depth", part["depth"], 0)
    if part.get("threads") is not None:
        _int("partition.threads", part["threads"], 1)
    _choice("partition.device", part.get("device", "cpu"), PROFILE_DEVICES)
    _choice("partition.verify", part.get("verify", True), (True, False))
    from partition.api import BACKENDS as CAPTURE_BACKENDS
    _choice("partition.backend", part.get("backend", "auto"), CAPTURE_BACKENDS)
    if part.get("device") == "cuda" and not _cuda_available():
        raise ConfigError("partition.device=cuda: no CUDA device here; allowed: cpu")

    par = _section(cfg, "parallel")
    n = _int("parallel.n", par.get("n"), 1)
    stride = _int("parallel.stride", par.get("stride"), 1)
    _choice("parallel.stride_noise", par.get("stride_noise"), STRIDE_NOISE)
    _choice("parallel.time_shift", par.get("time_shift"), (False, True))
    _choice("parallel.backend", par.get("backend"), BACKENDS)
    _int("parallel.threads", par.get("threads"), 1)
    replicas = _int("parallel.replicas", par.get("replicas"), 1)

    sch = _section(cfg, "scheduler")
    _choice("scheduler.name", sch.get("name"), scheduler_names())
    steps = _int("scheduler.steps", sch.get("steps"), 1)
    why = (" (W <= T = scheduler.steps; W >= 1 when n > 1: the last warm-up step seeds the "
           "stale cross-stage values)")
    _int("parallel.warmup", par.get("warmup"), 1 if n > 1 else 0, steps, why)
    validate_guidance(model, variant, sch.get("guidance"))
    _int("seed", cfg.get("seed"), 0)
    if cfg.get("batch") is not None:
        _int("batch", cfg["batch"], 1)
    validate_labels(model, cfg.get("labels"))
    if entry == "plan":
        return

    wandb = _section(cfg, "wandb")
    _choice("wandb.mode", wandb.get("mode"), WANDB_MODES)
    bench = cfg.get("bench") or {}
    _int("bench.repeats", bench.get("repeats", 1), 1)
    _int("bench.warmup_runs", bench.get("warmup_runs", 0), 0)

    if "RANK" in env and "WORLD_SIZE" in env:
        per = devices(par)
        world = int(env["WORLD_SIZE"])
        if world != replicas * per:
            raise ConfigError(
                f"WORLD_SIZE={world} (torchrun --nproc-per-node × nodes); allowed: "
                f"parallel.replicas × (n−1+stride) = {replicas} × ({n}−1+{stride}) = "
                f"{replicas * per}" + (" (stride_noise=reuse: n)" if par["stride_noise"] ==
                                       "reuse" else ""))

    # the runtime's own schedule checks (pure; e.g. stride_noise rules)
    from asyncdiff.timeline import build_timeline
    try:
        build_timeline(n, stride, par["warmup"], steps, par["time_shift"], par["stride_noise"])
    except ValueError as err:
        raise ConfigError(f"parallel.{err}") from None
