"""Stages: split == whole bit-exactly for every zoo model, strategy and N; each stage holds
exactly the parameters its nodes read; conditioning is replicated into stages, never sent."""
from __future__ import annotations

import re

import pytest
import torch

from partition import PartitionRequest
from experiments import zoo
from partition.cost import node_module
from tiers import model_params

MODELS = model_params(zoo.model_names())
STRATEGIES = ("balanced", "equal_blocks", "shell_core")
# Raised when a model has too few module blocks at the requested depth (legitimate).
TOO_FEW_BLOCKS = re.compile(r"only \d+ blocks|no placement found")


def compile_or_finer(t, n: int, strategy: str):
    """Compile at depth 4; only where the model has too few blocks there, at any node; skip
    only where it has too few nodes even then."""
    for depth in (4, None):
        try:
            return t.compile(PartitionRequest(n=n, depth=depth), strategy)
        except ValueError as err:
            assert TOO_FEW_BLOCKS.search(str(err)), f"{t.name} {strategy} n={n}: {err}"
    pytest.skip(f"{t.name}: too few blocks for {strategy} n={n} even at depth=None")


def check_interfaces(t, compiled) -> None:
    """Segment inputs are model inputs, the plan's cross-stage values into that stage, the
    hoisted values it reads (computed once per run), or values of an earlier segment of the
    same stage; nothing else."""
    plan, staged = compiled.plan, compiled.staged
    model_inputs = set(t.captured.placeholders.values())
    for s in range(plan.n):
        into = {v.name for v in plan.values if s in v.consumers}
        assert into == set(plan.stages[s].inputs)
        hoisted = set(plan.stages[s].hoisted)
        own_so_far: set[str] = set()
        read: set[str] = set()
        for seg in staged.stage_segments(s):
            assert set(seg.inputs) & hoisted <= hoisted
            foreign = set(seg.inputs) - model_inputs - own_so_far - hoisted
            assert foreign <= into, (s, foreign - into)
            read |= foreign
            own_so_far |= set(seg.outputs)
        assert read == into
        assert set(plan.stages[s].outputs) == {v.name for v in plan.values if v.producer == s}
    for v in plan.values:  # every value is sent to stages that differ from its producer
        assert v.consumers and v.producer not in v.consumers
    params = dict(t.captured.gm.named_parameters())
    total = sum(p.numel() for p in params.values())
    for seg in staged.segments:  # no parameter its own graph does not read
        read = {n.target for n in seg.gm.graph.nodes if n.op == "get_attr"}
        assert {k for k, _ in seg.gm.named_parameters()} <= read
    for s in range(plan.n):  # and no stage holds the whole model
        held = {k for seg in staged.stage_segments(s) for k, _ in seg.gm.named_parameters()}
        assert sum(params[k].numel() for k in held) < total


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("name", MODELS)
def test_split_equals_whole(tiny, name, n, strategy):
    t = tiny(name)
    compiled = compile_or_finer(t, n, strategy)
    plan = compiled.plan
    assert plan.n == n and plan.strategy == strategy
    assert sorted({st.index for st in plan.stages}) == list(range(n))
    assert all(st.nodes > 0 for st in plan.stages)
    assert sum(st.nodes for st in plan.stages) == t.graph.size
    assert torch.equal(t.run(compiled.staged), t.eager)
    check_interfaces(t, compiled)


def test_one_stage_is_the_whole_graph(sd15):
    compiled = sd15.compile(PartitionRequest(n=1))
    assert len(compiled.staged.segments) == 1 and compiled.plan.values == ()
    assert torch.equal(sd15.run(compiled.staged), sd15.eager)
    assert compiled.plan.bytes_per_step == 0 and compiled.plan.imbalance == 1.0


# --------------------------------------------------------------------------- parameters


def params_read_by(gm, names: set[str]) -> set[str]:
    """Parameter names read (through get_attr) by the nodes called ``names``."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    return {a.target for n in gm.graph.nodes if n.name in names
            for a in n.all_input_nodes if a.op == "get_attr" and a.target in params}


PARAM_CASES = [("sd15", "balanced", 2), ("sd15", "balanced", 3), ("sd15", "balanced", 4),
               ("sd15", "shell_core", 2), ("sdxl", "balanced", 3), ("sdxl", "shell_core", 3)]


@pytest.mark.parametrize("name, strategy, n", PARAM_CASES)
def test_each_stage_holds_only_its_own_parameters(tiny, name, strategy, n):
    t = tiny(name)
    compiled = compile_or_finer(t, n, strategy)
    gm, g, plan = t.captured.gm, t.graph, compiled.plan
    all_params = dict(gm.named_parameters(remove_duplicate=False))
    total = sum(p.numel() for p in all_params.values())
    trunk_read = params_read_by(gm, set(g.trunk))
    cond_read = params_read_by(gm, set(g.conditioning))
    assert not trunk_read & cond_read  # no parameter is both trunk and conditioning
    assert sum(all_params[p].numel() for p in cond_read) > 0  # time embedding at least
    assert plan.total_params == total
    stage_of = plan.stage_of()
    held_by = {}
    for s in range(n):
        mods = [*compiled.staged.stage_segments(s), *compiled.staged.stage_prologues(s)]
        own = {g.trunk[i] for i in range(g.size) if stage_of[i] == s}
        runs = {c for m in mods for c in m.conditioning} | own
        held: dict[str, torch.nn.Parameter] = {}
        for m in mods:
            got = dict(m.gm.named_parameters())
            # no parameter that its own graph does not read
            read = {n.target for n in m.gm.graph.nodes if n.op == "get_attr"}
            assert set(got) <= read
            held.update(got)
        assert set(held) == params_read_by(gm, runs)
        assert params_read_by(gm, own) <= set(held)
        for k, p in held.items():  # shared with the capture, not copied
            assert p.data_ptr() == all_params[k].data_ptr()
        held_by[s] = held
        assert sum(p.numel() for p in held.values()) < total, f"stage {s} holds every parameter"
    # every parameter lives somewhere; "own" counts what one stage alone holds, "replicated"
    # what several hold
    assert set().union(*held_by.values()) == set(all_params)
    for s in range(n):
        st, held = plan.stages[s], held_by[s]
        shared = {k for k in held if sum(k in h for h in held_by.values()) > 1}
        assert st.replicated_params == sum(held[k].numel() for k in shared)
        assert st.params + st.replicated_params == sum(p.numel() for p in held.values())
        assert st.param_bytes == 4 * (st.params + st.replicated_params)  # float32
    unique = sum(st.params for st in plan.stages)
    replicated = {k for s in range(n) for k in held_by[s]
                  if sum(k in h for h in held_by.values()) > 1}
    assert unique + sum(all_params[k].numel() for k in replicated) == total


# --------------------------------------------------------------------------- conditioning


def test_conditioning_is_replicated_never_sent(sd15):
    compiled = sd15.compile(PartitionRequest(n=3))
    g, plan, staged = sd15.graph, compiled.plan, compiled.staged
    cond = set(g.conditioning)
    assert plan.values
    for v in plan.values:
        assert v.name in g.pos and v.name not in cond
        assert not v.module.startswith(("time_embedding", "time_proj"))
    nodes = {n.name: n for n in sd15.captured.gm.graph.nodes}
    temb = {c for c in g.conditioning if node_module(nodes[c]) == "time_embedding.linear_2"}
    assert len(temb) >= 1
    placeholders = sd15.captured.placeholders
    ts, latent = placeholders["timestep"], placeholders["sample"]
    for s in range(plan.n):
        (seg,) = staged.stage_segments(s)
        assert temb <= set(seg.conditioning)  # every stage recomputes the time embedding
        assert ts in seg.inputs
        assert (latent in seg.inputs) == (s == 0)
        assert plan.stages[s].conditioning == len(seg.conditioning)


def test_timestep_reaches_a_stage_with_its_cross_stage_inputs_fixed(sd15):
    compiled = sd15.compile(PartitionRequest(n=3))
    ts = sd15.captured.placeholders["timestep"]
    env = compiled.staged.prepare(sd15.env)
    with torch.no_grad():
        for seg in compiled.staged.segments:
            env.update(seg(env))
        t0 = env[ts]
        t1 = (t0 + 137.0) % 1000.0
        assert not torch.equal(t0, t1)
        for seg in compiled.staged.segments:
            again = seg(env)  # same inputs: same outputs, bit-exact
            assert all(torch.equal(again[k], env[k]) for k in seg.outputs)
            moved = seg(dict(env, **{ts: t1}))  # only the timestep differs
            changed = [k for k in seg.outputs if not torch.equal(moved[k], env[k])]
            assert changed, f"stage {seg.stage} ignores the timestep"
            rel = max(float((moved[k] - env[k]).norm() / env[k].norm()) for k in changed)
            assert rel > 1e-4
