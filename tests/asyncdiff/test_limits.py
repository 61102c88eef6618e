"""The runtime's time limits: derived from the planned step time, or as configured."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import compiled

from asyncdiff.distributed import limits
from partition.plan import Measured


def _with_forward_ms(plan, ms: float):
    m = Measured(stage_ms=(ms / 2, ms / 2), total_ms=ms, threads=1, repeats=1)
    return dataclasses.replace(plan, measured=m)


def test_limits_scale_with_a_measured_step():
    """A 25 s forward (full-size SD 1.5 on one CPU thread) waits 250 s per peer and
    start-up + T × 250 s per run, where fixed limits (30 s, 600 s) would stop it as failed."""
    plan = _with_forward_ms(compiled(2).plan, 25_000.0)
    lim = limits.derive(plan, 50)
    assert lim.estimate_s == 25.0
    assert lim.step_s == 250.0 and lim.run_s == limits.STARTUP_S + 50 * 250.0


def test_limits_of_a_tiny_model_keep_the_floor_and_follow_flops():
    plan = dataclasses.replace(compiled(2).plan, measured=None)
    lim = limits.derive(plan, 10)
    assert lim.estimate_s == plan.step_flops / limits.FLOOR_FLOPS_PER_S
    assert lim.step_s == max(limits.MIN_STEP_S, limits.MARGIN * lim.estimate_s)


def test_configured_limits_win_and_bad_ones_are_named():
    plan = compiled(2).plan
    lim = limits.derive(plan, 10, step_s=5.0, run_s=40.0, startup_s=3.0)
    assert (lim.step_s, lim.run_s, lim.startup_s) == (5.0, 40.0, 3.0)
    assert limits.derive(plan, 10, step_s=5.0, startup_s=3.0).run_s == 3.0 + 10 * 5.0
    with pytest.raises(ValueError, match=r"^run_timeout_s=0; allowed: a number of seconds > 0"):
        limits.derive(plan, 10, run_s=0)
