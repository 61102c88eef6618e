"""Invariants of every strategy under random per-node costs (hypothesis), and split == whole
on random tiny UNets captured end to end."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from partition import InputSpec, PartitionRequest, build_graph, capture, compile_graph, profile
from experiments import zoo
from partition.spec import call_denoiser
from partition.strategies.balanced import balanced, equal_blocks
from partition.strategies.shell import shell_core
from partition.validate import validate_assignment

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
KINDS = ("uniform", "heavy", "sparse", "zeros", "spike", "flops")


@pytest.fixture(scope="module")
def base(sd15):
    return sd15.graph


def random_weights(graph, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = graph.size
    if kind == "uniform":
        return rng.random(k)
    if kind == "heavy":  # a few nodes dominate
        return rng.pareto(0.7, k)
    if kind == "sparse":  # most nodes free, as with FLOPs
        return rng.random(k) * (rng.random(k) < 0.1)
    if kind == "zeros":
        return np.zeros(k)
    if kind == "spike":
        w = np.zeros(k)
        w[rng.integers(k)] = 1.0
        return w
    return graph.weights * rng.uniform(0.5, 2.0, k)


def stage_max(graph, a) -> float:
    """The slowest stage: its trunk plus the per-step conditioning it replicates (what the
    strategies balance)."""
    return float(graph.stage_costs(a.stage_of, a.n).max())


def check_common(graph, a, n: int) -> None:
    validate_assignment(graph, a)  # the one validator every strategy goes through
    assert a.n == n and len(a.stage_of) == graph.size  # each trunk node exactly once
    assert set(a.stage_of) == set(range(n))  # no stage empty, none out of range
    assert a.stage_of[-1] == n - 1  # the last stage emits ε


def check_contiguous(graph, a, depth) -> None:
    so = a.stage_of
    assert list(so) == sorted(so)
    # acyclic stage graph: every value flows from a lower stage to a higher (or its own) one
    k = graph.size
    for i, cons in enumerate(graph.consumers):
        assert all(so[c] >= so[i] for c in cons if c < k)
    cuts = [start for _, start, _ in a.segments()][1:]
    assert set(cuts) <= set(graph.candidates(depth))


@settings(max_examples=40, **SETTINGS)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5),
       depth=st.sampled_from([2, 3, 4, None]))
@pytest.mark.slow
def test_contiguous_strategies_invariants(base, kind, seed, n, depth):
    g = dataclasses.replace(base, weights=random_weights(base, kind, seed))
    blocks = len(g.candidates(depth)) + 1
    assert blocks >= 5  # sd15 has enough blocks at every depth for n <= 5
    opt = balanced(g, PartitionRequest(n=n, depth=depth, slack=0.0))
    tie = balanced(g, PartitionRequest(n=n, depth=depth))  # default slack 0.01
    eq = equal_blocks(g, PartitionRequest(n=n, depth=depth))
    for a in (opt, tie, eq):
        check_common(g, a, n)
        check_contiguous(g, a, depth)
    best = stage_max(g, opt)
    assert best <= stage_max(g, eq) * (1 + 1e-9) + 1e-12
    assert stage_max(g, tie) <= best * (1 + 0.01) * (1 + 1e-9) + 1e-12
    # the DP's optimum is at least the trivial lower bounds
    assert best >= max(g.weights.sum() / n, 0) * (1 - 1e-9)


@settings(max_examples=12, **SETTINGS)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1), n=st.integers(2, 5),
       depth=st.sampled_from([2, 3, 4]))
@pytest.mark.slow
def test_shell_core_invariants(base, kind, seed, n, depth):
    g = dataclasses.replace(base, weights=random_weights(base, kind, seed))
    try:
        a = shell_core(g, PartitionRequest(n=n, depth=depth))
    except ValueError as err:  # legitimate only when no placement has enough blocks
        assert "no placement found" in str(err)
        return
    check_common(g, a, n)
    so = np.asarray(a.stage_of)
    shell = np.flatnonzero(so == n - 1)
    core = np.flatnonzero(so != n - 1)
    # last stage = prefix [0, a) + non-empty suffix [b, K); the core is contiguous in between
    assert shell[-1] == g.size - 1
    a_, b_ = core[0], core[-1] + 1
    assert (so[:a_] == n - 1).all() and (so[b_:] == n - 1).all()
    assert list(so[a_:b_]) == sorted(so[a_:b_]) and set(so[a_:b_]) == set(range(n - 1))
    coarse = set(g.candidates(2)) | {0}
    assert a_ in coarse and b_ in coarse
    fine = set(g.candidates(depth))
    inner = [p for p in range(a_ + 1, b_) if so[p] != so[p - 1]]
    assert set(inner) <= fine


# --------------------------------------------------------------------------- random UNets


@st.composite
def unet_configs(draw):
    levels = draw(st.integers(2, 4))
    cross = [draw(st.booleans()) for _ in range(levels)]
    if not any(cross):
        cross[0] = True
    channels = [draw(st.sampled_from([16, 32])) for _ in range(levels)]
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in cross[::-1]],
        "block_out_channels": channels,
        "layers_per_block": draw(st.integers(1, 2)),
        "norm_num_groups": 8,
        "cross_attention_dim": 16,
        "attention_head_dim": 4,
    }


@settings(max_examples=4, **SETTINGS)
@given(config=unet_configs(), n=st.integers(2, 4),
       strategy=st.sampled_from(["balanced", "equal_blocks", "shell_core"]))
@pytest.mark.slow
def test_random_unet_split_equals_whole(config, n, strategy):
    torch.set_num_threads(1)
    module = zoo.diffusers_from_config("diffusers.UNet2DConditionModel", config, seed=0)
    specs = (InputSpec("sample", (1, 4, 8, 8), role="latent"),
             InputSpec("timestep", (), role="timestep", init="timestep"),
             InputSpec("encoder_hidden_states", (1, 4, 16)))
    inputs = zoo.example_inputs(specs, seed=0)
    with torch.no_grad():
        eager = call_denoiser(module, inputs)
        captured = capture(module, specs, inputs)
        assert torch.equal(captured(inputs), eager)
        costs = profile(captured, inputs, repeats=0)
    graph = build_graph(captured, costs, "flops")
    compiled = compile_graph(graph, PartitionRequest(n=n), strategy=strategy,
                             cost_model="flops", name="random", config_hash="")
    assert compiled.plan.n == n and all(s.nodes for s in compiled.plan.stages)
    with torch.no_grad():
        assert torch.equal(compiled.staged.run(captured.env(inputs)), eager)
    assert eager.abs().max() > 0
