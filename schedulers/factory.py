"""Named, deterministic noise schedulers with Stable Diffusion's training schedule."""
from __future__ import annotations

import importlib
import inspect
from typing import Any

# SD 1.x/2.x training schedule (their scheduler_config.json), shared by every name.
_SD_SCHEDULE: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", prediction_type="epsilon",
                                    steps_offset=1)

# diffusers' class by name: imported when a scheduler is made (diffusers takes seconds to
# import, and the runtime's pure parts import this package for its protocol)
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    # The paper's sampler: 50 DDIM steps (AsyncDiff §4.1); η = 0 is DDIMScheduler.step's default.
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    "dpmsolver++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++")),
    "euler": ("EulerDiscreteScheduler", {}),
}
SCHEDULERS: tuple[str, ...] = tuple(_SCHEDULERS)


def make_scheduler(name: str, **kw: Any):
    """Build scheduler ``name`` (one of ``SCHEDULERS``); ``kw`` overrides its constructor
    arguments, e.g. ``beta_schedule`` or ``prediction_type``. Unknown names, unknown arguments
    and stochastic variants (``sde-*`` algorithms) raise ValueError."""
    if name not in _SCHEDULERS:
        raise ValueError(f"scheduler={name!r}; allowed: {', '.join(SCHEDULERS)}")
    cls_name, extra = _SCHEDULERS[name]
    cls = getattr(importlib.import_module("diffusers"), cls_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise ValueError(f"scheduler {name}: unknown argument(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(accepted))}")
    if str(kw.get("algorithm_type", "")).startswith("sde"):
        raise ValueError(f"scheduler {name}: algorithm_type={kw['algorithm_type']!r}; allowed: "
                         "dpmsolver++, dpmsolver (the sampling loop is deterministic)")
    return cls(**{**_SD_SCHEDULE, **extra, **kw})


def steps_problem(scheduler, steps: int) -> str | None:
    """Why ``scheduler`` (any diffusers scheduler) cannot sample ``steps`` steps, or None.

    T may not exceed the training timesteps, and the sampling loop, run on a one-element
    latent with ε = 0, must end finite: DDIM with ``steps_offset=1`` at T = 1000 makes
    timestep 1000 and indexes past ``alphas_cumprod``; DPM-Solver at T = 1000 repeats a
    timestep (a zero step size: NaN). A scheduler whose ``set_timesteps`` needs more than T
    (a flow-matching shift's ``mu``) is the pipeline's to set up: not judged here."""
    import torch

    train = scheduler.config.num_train_timesteps
    if steps > train:
        return f"{steps} is more than its {train} training timesteps"
    fresh = type(scheduler).from_config(scheduler.config)  # set_timesteps changes it
    try:
        fresh.set_timesteps(steps)
    except ValueError:
        return None
    x = torch.ones(1, 1, 1, 1)
    # the loop of schedulers.sample and of diffusers' pipelines; a stochastic step draws
    # from the global generator, which the run's own draws must not see moved
    with torch.random.fork_rng(devices=[]):
        try:
            for t in fresh.timesteps:
                x_in = fresh.scale_model_input(x, t) if hasattr(fresh, "scale_model_input") \
                    else x
                x = fresh.step(torch.zeros_like(x), t, x_in).prev_sample
        except IndexError:
            return f"at {steps} steps its step indexes past its {train} training timesteps"
    if not torch.isfinite(x).all():
        return f"at {steps} steps its timesteps repeat (a zero step: not finite)"
    return None


def max_steps(scheduler, tries: int = 16) -> int | None:
    """The largest T that :func:`steps_problem` accepts, looked for among the ``tries``
    largest T up to the training timesteps (None if none of them)."""
    train = scheduler.config.num_train_timesteps
    return next((t for t in range(train, max(train - tries, 0), -1)
                 if steps_problem(scheduler, t) is None), None)
