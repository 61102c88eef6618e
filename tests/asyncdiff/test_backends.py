"""Both capture backends obey one set of staleness rules ([Note: staleness]).

The module backend (blocks run eagerly, a block owned elsewhere answered by its owner's value)
is checked against the graph backend on a network both can run, with the same cuts: the
asynchronous samples must be the same bit for bit. Then its own invariants: W ≥ T is the
sequential sampler, and the multi-process executor equals the emulator."""
from __future__ import annotations

import functools

import denoisers as D  # noqa: N812 (tests/denoisers.py, on the path by tests/conftest.py)
import pytest
import torch
from conftest import emulate as emulate_steps

from asyncdiff.denoiser import SequentialDenoiser
from asyncdiff.distributed.launch import launch
from asyncdiff.distributed.worker import SamplingJob
from asyncdiff.schedule import Schedule
from partition import PartitionRequest, compile_model
from schedulers import make_scheduler, sample

STEPS = 6
BOUNDS = {2: ["blocks.3"], 3: ["blocks.2", "blocks.4"]}


@functools.lru_cache(maxsize=None)
def model():
    torch.manual_seed(0)
    m = D.SeqDenoiser(depth=6).eval()
    specs = D.seq_specs()
    return m, specs, D.example(specs)


@functools.lru_cache(maxsize=None)
def compiled(n: int, backend: str):
    m, specs, inputs = model()
    return compile_model(m, specs, inputs, PartitionRequest(
        n=n, depth=1, options={"boundaries": BOUNDS[n]}), strategy="manual", backend=backend)


def cond_and_noise():
    _, _, inputs = model()
    x = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(7))
    return {"context": inputs["context"]}, x


def emulate(c, par: Schedule, x, cond):
    return emulate_steps(c, par, x, cond, STEPS)


CASES = [(2, 1, 1, False, "fresh"), (2, 2, 1, True, "fresh"), (3, 1, 2, False, "fresh"),
         (3, 2, 1, False, "reuse"), (3, 1, 1, True, "fresh")]


@pytest.mark.parametrize("n,stride,warmup,shift,noise", CASES)
def test_module_backend_is_stale_exactly_as_the_graph_backend(n, stride, warmup, shift, noise):
    graph, module = compiled(n, "graph"), compiled(n, "module")
    assert (graph.plan.backend, module.plan.backend) == ("graph", "module")
    cond, x = cond_and_noise()
    par = Schedule(n=n, stride=stride, warmup=warmup, time_shift=shift, stride_noise=noise)
    a, b = emulate(graph, par, x, cond), emulate(module, par, x, cond)
    assert torch.equal(a, b)
    seq = sample(SequentialDenoiser(graph.staged), make_scheduler("ddim"), x, cond, steps=STEPS)
    assert not torch.equal(a, seq)  # the staleness is there, and the same in both


@pytest.mark.parametrize("n", [2, 3])
def test_module_backend_warmup_everything_is_sequential(n):
    c = compiled(n, "module")
    cond, x = cond_and_noise()
    par = Schedule(n=n, warmup=STEPS)
    seq = sample(SequentialDenoiser(compiled(n, "graph").staged),
                 make_scheduler("ddim"), x, cond, steps=STEPS)
    assert torch.equal(emulate(c, par, x, cond), seq)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,stride,warmup", [(2, 1, 1), (3, 2, 2)])
def test_module_backend_distributed_equals_emulator(n, stride, warmup):
    c = compiled(n, "module")
    cond, x = cond_and_noise()
    par = Schedule(n=n, stride=stride, warmup=warmup)
    want = emulate(c, par, x, cond)
    got = launch(c.staged, c.plan, par, [SamplingJob("ddim", STEPS, x, cond)])
    assert torch.equal(got.latents[0], want)


@pytest.mark.parametrize("n", [2, 3])
def test_a_shared_block_is_stale_exactly_as_the_graph_backend(n):
    """A block called at two positions (weight sharing) under the module backend: the same
    asynchronous samples as the graph backend with the same cuts."""
    torch.manual_seed(0)
    m, specs = D.SharedBlock().eval(), D.seq_specs()
    inputs = D.example(specs)
    request = PartitionRequest(n=n, depth=2, options={"boundaries": [
        "model.blocks.1", "model.blocks.2"][:n - 1]})
    graph, module = (compile_model(m, specs, inputs, request, strategy="manual", backend=b)
                     for b in ("graph", "module"))
    x = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(7))
    cond = {"context": inputs["context"]}
    par = Schedule(n=n, warmup=1)
    assert torch.equal(emulate(graph, par, x, cond), emulate(module, par, x, cond))
