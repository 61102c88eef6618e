"""A forward wrapped by the user (an instance attribute ``pipe.unet.forward = spy`` that
records what it is fed and calls the original) is honoured or refused in one line, never
bypassed: set before ``parallelize`` it is refused (the drop-in would take its place, and the
pipeline's calls would never reach it), nothing left attached; set after, it wraps the
drop-in's forward and sees every call, with the timesteps the pipeline feeds, and stays the
user's after ``detach()``."""
from __future__ import annotations

import pytest
import torch

import asyncdiff

import pipelines as P  # noqa: E402 (tests/pipelines.py, on the path by tests/conftest.py)

STEPS = 4


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _spy(module, seen: list):
    """The user's wrapper: records the fed timestep, calls what ``module.forward`` was."""
    inner = module.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["timestep"].detach().clone())
        return inner(*args, **kwargs)

    module.forward = spy
    return spy


def test_a_forward_wrapped_before_parallelize_is_refused_in_one_line():
    pipe = P.built("sana")
    spy = _spy(pipe.transformer, [])
    with pytest.raises(ValueError) as err:
        asyncdiff.parallelize(pipe, n=2)
    said = str(err.value)
    assert said.startswith("pipe.transformer.forward is a wrapper set on the module "
                           "(_spy.<locals>.spy): the drop-in replaces the forward, so the "
                           "pipeline's calls would no longer reach it; allowed: no wrapper "
                           "when parallelize is called (del pipe.transformer.forward, then "
                           "parallelize)"), said
    assert "\n" not in said
    # nothing left half-attached: the wrapper and the scheduler are as they were
    assert pipe.transformer.__dict__["forward"] is spy
    assert not {"step", "set_timesteps", "set_begin_index"} & set(pipe.scheduler.__dict__)
    del pipe.transformer.forward
    asyncdiff.parallelize(pipe, n=2).detach()


def test_a_second_denoiser_wrapped_leaves_the_first_as_it_was():
    pipe = P.built("wan22_two_experts")
    spy = _spy(pipe.transformer_2, [])
    with pytest.raises(ValueError, match=r"^pipe.transformer_2.forward is a wrapper set on "
                                         r"the module"):
        asyncdiff.parallelize(pipe, n=2)
    assert "forward" not in pipe.transformer.__dict__
    assert pipe.transformer_2.__dict__["forward"] is spy


def test_a_forward_wrapped_after_parallelize_sees_every_call():
    """The spy set over the drop-in's forward: every call reaches it with the timestep the
    plain pipeline feeds; every call warm gives the plain latents bit for bit; the first
    call's capture does not take the spy off; after ``detach()`` it is still there and the
    pipeline is plain again under it."""
    case = P.PIPELINES["sana"]
    pipe = P.built("sana")
    fed_plain: list = []
    _spy(pipe.transformer, fed_plain)
    plain = case.call(pipe, STEPS)
    del pipe.transformer.forward
    assert len(fed_plain) == STEPS

    handle = asyncdiff.parallelize(pipe, n=2, warmup=STEPS)
    fed: list = []
    spy = _spy(pipe.transformer, fed)
    warm = case.call(pipe, STEPS)
    assert pipe.transformer.__dict__["forward"] is spy
    with pytest.raises(RuntimeError, match="already parallelized"):  # the spy hides the proxy
        asyncdiff.parallelize(pipe, n=2)
    handle.set_timeline(warmup=1)
    stale = case.call(pipe, STEPS)
    handle.detach()
    assert pipe.transformer.__dict__["forward"] is spy   # the user's, not the drop-in's
    after = case.call(pipe, STEPS)
    assert torch.equal(warm, plain) and torch.equal(after, plain)
    assert not torch.equal(stale, plain)
    assert len(fed) == 3 * STEPS
    for run in range(3):
        assert all(torch.equal(a, b) for a, b in zip(fed[run * STEPS:(run + 1) * STEPS],
                                                      fed_plain))
    del pipe.transformer.forward
    assert "forward" not in pipe.transformer.__dict__
    asyncdiff.parallelize(pipe, n=2).detach()  # attachable again
