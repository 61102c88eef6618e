"""Every scheduler name builds with the paper's schedule; bad names and arguments are loud."""
from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from schedulers import SCHEDULERS, make_scheduler
from schedulers.factory import max_steps, steps_problem


@pytest.mark.parametrize("name, cls", [("ddim", DDIMScheduler),
                                       ("dpmsolver++", DPMSolverMultistepScheduler),
                                       ("euler", EulerDiscreteScheduler)])
def test_each_name_builds(name, cls):
    s = make_scheduler(name)
    assert type(s) is cls
    c = s.config
    assert (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.steps_offset,
            c.prediction_type) == (1000, 0.00085, 0.012, "scaled_linear", 1, "epsilon")
    s.set_timesteps(50)
    assert len(s.timesteps) == 50


def test_ddim_is_the_papers():
    c = make_scheduler("ddim").config
    assert (c.clip_sample, c.set_alpha_to_one) == (False, False)
    assert make_scheduler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert set(SCHEDULERS) == {"ddim", "dpmsolver++", "euler"}


def test_overrides():
    s = make_scheduler("ddim", beta_schedule="linear", prediction_type="v_prediction")
    assert (s.config.beta_schedule, s.config.prediction_type) == ("linear", "v_prediction")


def test_unknown_name():
    with pytest.raises(ValueError) as err:
        make_scheduler("pndm")
    msg = str(err.value)
    assert msg.startswith("scheduler=") and "\n" not in msg
    assert all(name in msg for name in SCHEDULERS)


def test_unknown_argument_and_stochastic_variant():
    with pytest.raises(ValueError, match="unknown argument.*beta_shedule"):
        make_scheduler("euler", beta_shedule="linear")
    with pytest.raises(ValueError, match="algorithm_type"):
        make_scheduler("dpmsolver++", algorithm_type="sde-dpmsolver++")


def _samples(scheduler, steps: int) -> bool:
    """Ground truth: the sampling loop runs ``steps`` steps to a finite latent (a denoiser
    that predicts no noise; the scheduler's own indexing is what is tested)."""
    import torch

    from schedulers import sample

    fresh = type(scheduler).from_config(scheduler.config)
    try:
        x = sample(lambda x, t, k, c: torch.zeros_like(x), fresh, torch.ones(1, 1, 2, 2), {},
                   steps=steps)
    except (ValueError, IndexError):
        return False
    return bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name", SCHEDULERS)
def test_max_steps_is_the_most_the_sampling_loop_runs(name):
    s = make_scheduler(name)
    limit = max_steps(s)
    train = s.config.num_train_timesteps
    assert 1 <= limit <= train
    assert steps_problem(s, limit) is None and _samples(s, limit)
    assert steps_problem(s, limit + 1) is not None
    assert limit + 1 > train or not _samples(s, limit + 1)


def test_ddim_with_steps_offset_stops_one_short_of_its_training_timesteps():
    # steps_offset=1: T = 1000 gives timesteps 1 … 1000, and 1000 indexes past alphas_cumprod
    s = make_scheduler("ddim")
    assert s.config.steps_offset == 1
    assert "indexes" in steps_problem(s, s.config.num_train_timesteps)
    assert "training timesteps" in steps_problem(s, 4 * s.config.num_train_timesteps)
    assert steps_problem(make_scheduler("ddim", steps_offset=0), 1000) is None
