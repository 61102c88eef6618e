"""The drop-in and the pipeline's scheduler: it consults only the scheduler the pipeline built
(its class and that class's bases, [Note: drop-in steps]), never diffusers' list of schedulers,
so a scheduler whose backend is missing (``DPMSolverSDEScheduler`` without ``torchsde``) is
neither imported nor made; and every Karras scheduler a pipeline can be given runs through
it exactly (diffusers' ``test_karras_schedulers_shape`` loop, on the ControlNet pipeline)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import asyncdiff

import pipelines as P  # noqa: E402 (tests/pipelines.py, on the path by tests/conftest.py)

ROOT = Path(__file__).parents[2]

# in a fresh interpreter: any diffusers scheduler module not imported when the pipeline was
# built is refused on import, then the drop-in is attached, run, detached
_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import pipelines as P
    import asyncdiff

    torch.set_num_threads(1)
    pipe = P.PIPELINES["sana"].build()
    pipe.set_progress_bar_config(disable=True)
    built = {m for m in sys.modules if m.startswith("diffusers.schedulers.scheduling_")}

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.startswith("diffusers.schedulers.scheduling_") and name not in built:
                raise ImportError(f"the drop-in imported {name}")

    sys.meta_path.insert(0, Refuse())
    plain = P.PIPELINES["sana"].call(pipe, 3)
    with asyncdiff.parallelize(pipe, n=2, warmup=3):
        warm = P.PIPELINES["sana"].call(pipe, 3)
    assert torch.equal(warm, plain)
    new = sorted(m for m in sys.modules
                 if m.startswith("diffusers.schedulers.scheduling_") and m not in built)
    assert not new, new
    assert "diffusers.schedulers.scheduling_dpmsolver_sde" not in sys.modules
    print("ok", type(pipe.scheduler).__name__)
""")


def test_no_scheduler_but_the_pipelines_own_is_imported():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def _backend_missing(cls) -> bool:
    """diffusers' stand-in for a class whose backend is not installed (DPMSolverSDEScheduler
    without torchsde): making it raises ImportError, with or without the drop-in."""
    return cls.__module__.startswith("diffusers.utils.dummy_")


@pytest.mark.slow
def test_every_karras_scheduler_runs_exactly_through_the_dropin():
    """diffusers' ``test_karras_schedulers_shape`` loop on the ControlNet pipeline: the
    scheduler replaced by each Karras scheduler in turn (two steps, KDPM2 five), the drop-in
    attached throughout. Every call warm: each scheduler's latents equal the plain pipeline's
    bit for bit. A scheduler whose backend is missing fails in the loop's own ``from_config``
    (diffusers' stand-in class), as it does without the drop-in."""
    import diffusers
    from diffusers.schedulers import KarrasDiffusionSchedulers

    torch.set_num_threads(1)
    case = P.PIPELINES["sd15_controlnet"]
    pipe = case.build()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.register_to_config(skip_prk_steps=True)  # PNDM without its warm-up
    config = pipe.scheduler.config
    made = {}
    for entry in KarrasDiffusionSchedulers:
        cls = getattr(diffusers, entry.name)
        if _backend_missing(cls):
            with pytest.raises(ImportError):
                cls.from_config(config)
            continue
        made[entry.name] = (cls, 5 if "KDPM2" in entry.name else 2)
    plain = {}
    for name, (cls, steps) in made.items():
        pipe.scheduler = cls.from_config(config)
        plain[name] = case.call(pipe, steps)
    with asyncdiff.parallelize(pipe, n=2, warmup=100):
        for name, (cls, steps) in made.items():
            pipe.scheduler = cls.from_config(config)
            assert torch.equal(case.call(pipe, steps), plain[name]), name
    ran = list(made)
    assert "DPMSolverMultistepScheduler" in ran and "HeunDiscreteScheduler" in ran
    if _backend_missing(diffusers.DPMSolverSDEScheduler):
        assert "diffusers.schedulers.scheduling_dpmsolver_sde" not in sys.modules
