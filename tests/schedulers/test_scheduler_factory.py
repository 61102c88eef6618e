"""Every scheduler name builds with the paper's schedule; bad names and arguments are loud."""
from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from schedulers import SCHEDULERS, make_scheduler


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
