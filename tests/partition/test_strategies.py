"""Strategies on the sd15 tiny graph: memory cap, the communication-aware tie-break, the
manual strategy's errors, and shell_core's placement and Pareto notes."""
from __future__ import annotations

import re

import numpy as np
import pytest

from partition import PartitionRequest, STRATEGIES, compile_model
from partition.strategies.balanced import balanced, equal_blocks
from partition.strategies.manual import manual
from partition.strategies.shell import exact_bytes, shell_core


def stage_costs(graph, a) -> np.ndarray:
    """Per-step cost of each stage: trunk + the per-step conditioning it replicates."""
    return graph.stage_costs(a.stage_of, a.n)


def own_param_bytes(graph, a) -> np.ndarray:
    so = np.asarray(a.stage_of)
    return np.array([graph.param_bytes[so == s].sum() for s in range(a.n)])


def cuts_of(a) -> list[int]:
    return [start for _, start, _ in a.segments()][1:]


# --------------------------------------------------------------------------- memory cap


def test_memory_cap_bounds_every_stage(sd15):
    g = sd15.graph
    free = balanced(g, PartitionRequest(n=3))
    # sd15 tiny has no buffers in its trunk: parameter bytes are 4 × parameter count
    assert g.param_bytes.sum() == 4 * g.param_count.sum()
    cap = 5_000_000
    assert own_param_bytes(g, free).max() > cap  # the unconstrained split breaks this cap
    capped = balanced(g, PartitionRequest(n=3, memory_cap=cap))
    assert (own_param_bytes(g, capped) <= cap).all()
    assert stage_costs(g, capped).max() >= stage_costs(g, free).max()
    compiled = sd15.compile(PartitionRequest(n=3, memory_cap=cap))
    # everything a stage holds (trunk, replicated conditioning, its once-per-run prologue)
    assert all(st.param_bytes <= cap for st in compiled.plan.stages)
    assert compiled.plan.stage_of() == capped.stage_of


@pytest.mark.parametrize("cap", [1, 4_000_000])
def test_impossible_memory_cap_raises(sd15, cap):
    # 1 byte: no block fits. 4 MB: every block fits, but sd15's 11.9 MB of trunk parameters
    # cannot be cut into 3 stages of at most 4 MB at module boundaries.
    with pytest.raises(ValueError, match="memory_cap"):
        balanced(sd15.graph, PartitionRequest(n=3, memory_cap=cap))


@pytest.mark.parametrize("strategy", ["equal_blocks", "shell_core"])
def test_other_strategies_do_not_ignore_a_memory_cap(sd15, strategy):
    with pytest.raises(ValueError, match="memory_cap"):
        STRATEGIES[strategy](sd15.graph, PartitionRequest(n=3, memory_cap=1))


# --------------------------------------------------------------------------- tie-break


@pytest.mark.parametrize("n", [2, 3, 4])
def test_comm_aware_tie_break(sd15, n):
    g = sd15.graph
    tight = balanced(g, PartitionRequest(n=n, slack=0.0))
    loose = balanced(g, PartitionRequest(n=n, slack=0.2))
    opt = stage_costs(g, tight).max()
    assert stage_costs(g, loose).max() <= 1.2 * opt * (1 + 1e-12)
    # the objective the tie-break minimises: the exact point-to-point bytes per step
    sent = [exact_bytes(g, a.stage_of) for a in (tight, loose)]
    assert sent[1] <= sent[0]
    if n == 2:
        assert sent[1] < sent[0]  # and the slack buys something here (measured)


def test_comm_aware_tie_break_never_sends_more_bytes(sd15):
    for n in (2, 3, 4):
        tight = sd15.compile(PartitionRequest(n=n, slack=0.0)).plan
        loose = sd15.compile(PartitionRequest(n=n, slack=0.2)).plan
        assert loose.bytes_per_step <= tight.bytes_per_step, n


def test_slack_zero_is_the_min_max_optimum_over_module_boundaries(sd15):
    # brute force over every pair of depth-2 boundaries (few enough to enumerate)
    g = sd15.graph
    cands = g.candidates(2)

    def worst(a: int, b: int) -> float:  # each stage: trunk + its per-step conditioning
        stage_of = [0] * a + [1] * (b - a) + [2] * (g.size - b)
        return float(g.stage_costs(stage_of, 3).max())
    best = min(worst(a, b) for i, a in enumerate(cands) for b in cands[i + 1:])
    got = balanced(g, PartitionRequest(n=3, depth=2, slack=0.0))
    assert stage_costs(g, got).max() == best
    assert set(cuts_of(got)) <= set(cands)


def test_equal_blocks_gives_every_stage_the_same_number_of_blocks(sd15):
    g = sd15.graph
    cands = g.candidates(4)
    for n in (2, 3, 4, 5):
        a = equal_blocks(g, PartitionRequest(n=n))
        bounds = [0, *cuts_of(a), g.size]
        blocks = [1 + sum(lo < c < hi for c in cands) for lo, hi in zip(bounds, bounds[1:])]
        assert sum(blocks) == len(cands) + 1
        assert max(blocks) - min(blocks) <= 1


def test_too_many_stages_is_an_error(sd15):
    blocks = len(sd15.graph.candidates(1)) + 1
    with pytest.raises(ValueError, match=rf"only {blocks} blocks"):
        balanced(sd15.graph, PartitionRequest(n=blocks + 1, depth=1))
    with pytest.raises(ValueError, match=rf"only {blocks} blocks"):
        equal_blocks(sd15.graph, PartitionRequest(n=blocks + 1, depth=1))


def test_unknown_strategy_and_cost_model(sd15):
    assert set(STRATEGIES) == {"balanced", "equal_blocks", "manual", "shell_core"}
    with pytest.raises(ValueError, match="strategy='greedy'.*allowed: balanced"):
        sd15.compile(PartitionRequest(n=2), strategy="greedy")
    with pytest.raises(ValueError, match="cost_model='joules'.*allowed: time, flops, fvcore"):
        compile_model(sd15.bundle.module, sd15.bundle.specs, sd15.inputs,
                      PartitionRequest(n=2), cost_model="joules", captured=sd15.captured,
                      costs=sd15.costs)
    with pytest.raises(ValueError, match="n=0; allowed: n >= 1"):
        sd15.compile(PartitionRequest(n=0))


# --------------------------------------------------------------------------- manual


def test_manual_boundaries(sd15):
    g = sd15.graph
    a = manual(g, PartitionRequest(n=3, options={"boundaries": ["mid_block", "up_blocks.2"]}))
    starts = cuts_of(a)
    assert [g.modules[p].split(".")[0] for p in starts] == ["mid_block", "up_blocks"]
    assert g.modules[starts[1]].startswith("up_blocks.2")
    assert not g.modules[starts[0] - 1].startswith("mid_block")
    assert all(not g.modules[i].startswith("up_blocks.2") for i in range(starts[1]))


@pytest.mark.parametrize("options, n, message", [
    ({"boundaries": ["up_blocks.7"]}, 2, r"no traced module 'up_blocks\.7'.*down_blocks\.0"),
    ({"boundaries": ["mid_blok"]}, 2, r"'mid_blok'"),
    ({"boundaries": ["mid_block"]}, 3, r"boundaries: 1 given for n=3"),
    ({"boundaries": ["mid_block", "up_blocks.1", "up_blocks.2"]}, 3,
     r"boundaries: 3 given for n=3"),
    ({"boundaries": ["up_blocks.1", "mid_block"]}, 3, r"boundaries: .*strictly increasing"),
    ({"boundaries": ["conv_in"]}, 2, r"boundaries: .*not at the very first node"),
    ({"stages": [["down_blocks.9"], ["conv_in"]]}, 2,
     r"stages\[0\]: no traced module 'down_blocks\.9'"),
    ({"stages": [["mid_block"]]}, 2, r"stages: 1 lists given for n=2"),
    ({}, 2, r"exactly one of 'boundaries' or 'stages'"),
    ({"boundaries": ["mid_block"], "stages": [["mid_block"], ["conv_in"]]}, 2,
     r"exactly one of 'boundaries' or 'stages'"),
])
def test_manual_errors_name_the_key(sd15, options, n, message):
    with pytest.raises(ValueError, match=message):
        manual(sd15.graph, PartitionRequest(n=n, options=options))


def test_manual_stage_that_does_not_emit_the_output_is_rejected(sd15):
    # the output (conv_out) listed on stage 0 of 2: the validator refuses it
    opts = {"stages": [["conv_out", "mid_block"], ["conv_in", "down_blocks", "up_blocks"]]}
    with pytest.raises(ValueError, match="emitting the output must be the last stage"):
        sd15.compile(PartitionRequest(n=2, options=opts), strategy="manual")


# --------------------------------------------------------------------------- shell_core

PARETO = re.compile(r"pareto: imbalance (\d+\.\d{3}), (\d+\.\d{3}) MiB/step, "
                    r"shell \[0,(\d+)\)\+\[(\d+),(\d+)\)")


@pytest.mark.parametrize("n", [2, 3])
def test_shell_core_last_stage_is_prefix_plus_suffix(sd15, n):
    g = sd15.graph
    compiled = sd15.compile(PartitionRequest(n=n), strategy="shell_core")
    plan = compiled.plan
    last = plan.stages[-1]
    assert len(last.segments) == 2
    prefix, suffix = last.segments
    assert prefix.start == 0 and suffix.stop == g.size
    assert prefix.first_module == "conv_in" and suffix.last_module == "conv_out"
    assert all(len(st.segments) == 1 for st in plan.stages[:-1])
    a, b = prefix.stop, suffix.start
    assert plan.notes[0] == f"shell = [0, {g.module_at(a)}) + [{g.module_at(b)}, end)"
    front = [PARETO.fullmatch(line) for line in plan.notes[1:]]
    assert front and all(front), plan.notes
    imb = [float(m.group(1)) for m in front]
    mib = [float(m.group(2)) for m in front]
    assert imb == sorted(imb) and mib == sorted(mib, reverse=True)
    assert len(set(mib)) == len(mib)
    # the chosen placement is on the front, with its exact imbalance and bytes
    sent = exact_bytes(g, plan.stage_of())
    assert sent == plan.bytes_per_step - plan.output_bytes * (n - 1)
    chosen = (f"pareto: imbalance {plan.imbalance:.3f}, {sent / 2**20:.3f} MiB/step, "
              f"shell [0,{a})+[{b},{g.size})")
    assert chosen in plan.notes
    assert all(int(m.group(5)) == g.size for m in front)


def test_shell_core_needs_two_stages(sd15):
    with pytest.raises(ValueError, match="shell_core: n=1; allowed: n >= 2"):
        shell_core(sd15.graph, PartitionRequest(n=1))
