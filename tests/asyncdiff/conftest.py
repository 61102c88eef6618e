"""Shared fixtures for the runtime tests: a tiny *sensitive* SD-1.5-layout UNet, compiled.

docs/design.md §2: every parameter is re-drawn at random (the zoo does it) and the output must
depend measurably on the timestep; ``test_model_is_sensitive`` checks both, so a change that
made the model insensitive would fail loudly instead of making the equivalences vacuous.
"""
from __future__ import annotations

import functools

import pytest
import torch

from partition import PartitionRequest, compile_graph
from experiments import zoo
from partition.capture import capture
from partition.cost import profile
from partition.graph import build_graph

THREADS = 1
STEPS = 6


@functools.lru_cache(maxsize=None)
def tiny(rows: int = 2):
    """The tiny UNet captured for a batch of ``rows`` (the example's 2, or one guidance half
    of it: CFG-parallel runs each half as its own batch)."""
    torch.set_num_threads(THREADS)
    cfg = zoo.load_yaml("sd15")
    cfg["tiny"]["inputs"] = [{**d, "shape": [rows, *d["shape"][1:]]} if d.get("shape") else d
                             for d in cfg["tiny"]["inputs"]]
    bundle = zoo.build(cfg, seed=0)
    inputs = bundle.inputs(0)
    captured = capture(bundle.module, bundle.specs, inputs, bundle.contract)
    graph = build_graph(captured, profile(captured, inputs, repeats=0), "flops")
    return bundle, inputs, graph


@functools.lru_cache(maxsize=None)
def compiled(n: int, strategy: str = "balanced", rows: int = 2):
    _, _, graph = tiny(rows)
    return compile_graph(graph, PartitionRequest(n=n, depth=4), strategy=strategy,
                         cost_model="flops", name="sd15/tiny", config_hash="")


def cond_and_noise(seed: int = 1):
    _, inputs, _ = tiny()
    cond = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
    x = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(seed))
    return cond, x


def emulate(c, par, x, cond, steps: int = STEPS):
    """The emulator under the sampler: what the distributed executor must equal."""
    from asyncdiff.denoiser import PipelineDenoiser
    from asyncdiff.emulate import Emulator
    from schedulers import make_scheduler, sample

    sched = make_scheduler("ddim")
    sched.set_timesteps(steps)
    emu = Emulator(c.staged, c.plan, par.timeline(steps), sched.timesteps)
    return sample(PipelineDenoiser(emu), make_scheduler("ddim"), x, cond, steps=steps)


@pytest.fixture(autouse=True)
def _pin_threads():
    torch.set_num_threads(THREADS)
