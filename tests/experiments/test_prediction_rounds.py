"""The latency prediction counts the timeline's parallel rounds (the public code's schedule
with an even W has a load-only step: one round fewer than ⌈(T−W)/S⌉)."""
from __future__ import annotations

import dataclasses

from asyncdiff.schedule import Schedule
from experiments.common import parallel_rounds
from partition.plan import Measured
from partition.report import predict


def test_official_even_warmup_has_one_round_fewer():
    par = Schedule(n=3, stride=2, warmup=2)
    assert parallel_rounds(par.replace(stride_noise="reuse"), 9) == 4       # (2,3) … (8,)
    assert parallel_rounds(par.replace(stride_noise="official"), 9) == 3    # (3,4) (5,6) (7,8)
    assert parallel_rounds(par.replace(warmup=3, stride_noise="official"), 9) == 3


def test_predict_uses_the_rounds_it_is_given():
    from experiments import zoo
    from partition import PartitionRequest, compile_model

    bundle = zoo.build(zoo.load_yaml("dit"), seed=0)
    plan = compile_model(bundle.module, bundle.specs, bundle.inputs(0), PartitionRequest(n=3),
                         name="dit/tiny", config_hash="").plan
    plan = dataclasses.replace(plan, measured=Measured((10.0, 10.0, 10.0), 30.0, 1, 1))
    by_formula = predict(plan, steps=9, warmup=2, stride=2)
    counted = predict(plan, steps=9, warmup=2, stride=2, rounds=3)
    step, warm = counted["step_ms"], 30.0 + counted["seq_comm_ms"]
    assert counted["seq_comm_ms"] > 0  # a warm-up round sends every crossing value
    assert by_formula["latency_ms"] == 2 * warm + 4 * step   # ⌈(9 − 2) / 2⌉ rounds
    assert counted["latency_ms"] == 2 * warm + 3 * step


def test_predict_guidance_groups_and_cached_steps():
    """CFG-parallel: the sequential sampler does both halves' work, each step swaps one ε
    half; a step cache: full steps, then the last stage alone, no communication."""
    from experiments import zoo
    from partition import PartitionRequest, compile_model

    bundle = zoo.build(zoo.load_yaml("dit"), seed=0)
    plan = compile_model(bundle.module, bundle.specs, bundle.inputs(0), PartitionRequest(n=3),
                         name="dit/tiny", config_hash="").plan
    plan = dataclasses.replace(plan, measured=Measured((10.0, 12.0, 8.0), 30.0, 1, 1))
    one = predict(plan, steps=9, warmup=9)
    two = predict(plan, steps=9, warmup=9, groups=2)
    assert two["sequential_ms"] == 2 * one["sequential_ms"] == 2 * 9 * 30.0
    assert two["eps_comm_ms"] > 0
    assert two["latency_ms"] == one["latency_ms"] + 9 * two["eps_comm_ms"]
    cache = predict(plan, steps=9, warmup=3, rounds=0, cached=6, comm=False)
    assert cache["latency_ms"] == 3 * 30.0 + 6 * 8.0
    flops = dataclasses.replace(plan, measured=None)
    assert predict(flops, steps=9, warmup=1)["unit"] == "flops"
    assert predict(flops, steps=9, warmup=1, ms_per_flop=1e-9)["comm_ms"] > 0
