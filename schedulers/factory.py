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
