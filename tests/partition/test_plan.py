"""The Plan as data: JSON round-trip, determinism across independent runs and processes,
rebuilding stages from a saved plan, the ``time`` cost model, and the asyncdiff-plan entry."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import experiments.common
import experiments.plan
from omegaconf import OmegaConf
from partition import PartitionRequest, Plan, compile_model, format_plan, stages_from_plan
from partition.plan import Measured
from experiments import zoo
from tiers import model_params

REPO = Path(__file__).resolve().parents[2]
REQUESTS = [
    ("balanced", PartitionRequest(n=3)),
    ("balanced", PartitionRequest(n=2, depth=None, slack=0.0)),
    ("equal_blocks", PartitionRequest(n=4, depth=2)),
    ("shell_core", PartitionRequest(n=3)),
    ("manual", PartitionRequest(n=2, options={"stages": [
        ["mid_block"], ["conv_in", "down_blocks", "up_blocks", "conv_out"]]})),
]


def assert_round_trips(plan: Plan) -> None:
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    assert back.plan_hash == plan.plan_hash
    json.loads(text)  # plain JSON


@pytest.mark.parametrize("strategy, request_", REQUESTS)
def test_json_round_trip(sd15, strategy, request_):
    plan = sd15.compile(request_, strategy).plan
    assert_round_trips(plan)
    assert plan.measured is None
    assert "measured" not in json.loads(plan.to_json(measured=False))
    assert plan.stage_of() == plan.assignment().stage_of
    assert len(plan.stage_of()) == sd15.graph.size


def test_unknown_schema_is_an_error(sd15):
    d = json.loads(sd15.compile(PartitionRequest(n=2)).plan.to_json())
    d["schema"] = 99
    with pytest.raises(ValueError, match="plan schema=99; allowed: 2"):
        Plan.from_dict(d)


@pytest.mark.slow
def test_independent_runs_give_byte_identical_plans(sd15, fresh):
    other = fresh("sd15")  # a second build, capture and profile, sharing nothing
    assert other.captured is not sd15.captured
    assert other.captured.graph_hash() == sd15.captured.graph_hash()
    for strategy, request_ in REQUESTS:
        a = sd15.compile(request_, strategy).plan
        b = other.compile(request_, strategy).plan
        assert a.to_json(measured=False) == b.to_json(measured=False), strategy
        assert a.plan_hash == b.plan_hash
    # stages rebuilt from the saved plan on the other capture chain exactly
    compiled = sd15.compile(PartitionRequest(n=3), "shell_core")
    saved = Plan.from_json(compiled.plan.to_json())
    staged = stages_from_plan(other.graph, saved)
    assert [(s.stage, s.start, s.stop) for s in staged.segments] == \
        [(s.stage, s.start, s.stop) for s in compiled.staged.segments]
    assert [s.inputs for s in staged.segments] == [s.inputs for s in compiled.staged.segments]
    with torch.no_grad():
        assert torch.equal(staged.run(other.env), other.eager)
        assert torch.equal(staged.run(other.env), compiled.staged.run(sd15.env))


_SUBPROCESS = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import build_tiny
from partition import PartitionRequest
t = build_tiny("dit", seed=1)
print(json.dumps([t.compile(PartitionRequest(n=n), s).plan.to_json(measured=False)
                  for s, n in (("balanced", 3), ("shell_core", 2))]))
"""


@pytest.mark.slow
def test_plan_is_the_same_in_another_process_and_for_other_weights(tiny):
    # Another interpreter with another string-hash seed (set orders differ) and other random
    # weights (a plan depends on the architecture and the shapes only): the same bytes.
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    code = _SUBPROCESS.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    dit = tiny("dit")
    here = [dit.compile(PartitionRequest(n=n), s).plan.to_json(measured=False)
            for s, n in (("balanced", 3), ("shell_core", 2))]
    assert json.loads(out.stdout) == here


def test_plan_for_another_graph_is_refused(sd15, tiny):
    plan = sd15.compile(PartitionRequest(n=2)).plan
    with pytest.raises(ValueError, match="plan graph_hash=0000000000000000 but this capture is"):
        stages_from_plan(sd15.graph, dataclasses.replace(plan, graph_hash="0" * 16))
    with pytest.raises(ValueError, match="another model, shape or library version"):
        stages_from_plan(tiny("dit").graph, plan)
    assert len(stages_from_plan(sd15.graph, plan).segments) == 2


# --------------------------------------------------------------------------- time cost model


def test_time_cost_model(sd15):
    compiled = compile_model(sd15.bundle.module, sd15.bundle.specs, sd15.inputs,
                             PartitionRequest(n=3), cost_model="time", repeats=1,
                             captured=sd15.captured, name="sd15/tiny")
    plan = compiled.plan
    assert plan.cost_model == "time"
    m = plan.measured
    assert m is not None and len(m.stage_ms) == 3
    assert all(ms > 0 for ms in m.stage_ms)
    assert (m.repeats, m.threads) == (1, 1)
    assert m.total_ms > 0 and plan.time_imbalance >= 1.0
    # the weights balanced were the measured times, on the same capture
    assert compiled.graph.costs.ms and compiled.graph.captured is sd15.captured
    # each stage's cost: its trunk nodes (every trunk node in exactly one stage) plus the
    # per-step conditioning it replicates
    assert sum(st.cost - st.cond_cost for st in plan.stages) == \
        pytest.approx(sum(compiled.graph.weights), rel=1e-12)
    cw = compiled.graph.cond.weights
    for st in plan.stages:
        repl = {c for seg in compiled.staged.stage_segments(st.index) for c in seg.conditioning}
        assert st.cond_cost == pytest.approx(sum(cw[c] for c in repl), rel=1e-12)
    assert_round_trips(plan)
    # measured numbers are excluded from the hash
    assert plan.plan_hash == dataclasses.replace(plan, measured=None).plan_hash
    assert torch.equal(sd15.run(compiled.staged), sd15.eager)
    assert "time:" in format_plan(plan)


@pytest.mark.parametrize("n", [1, 3])
def test_the_sequential_step_comes_from_the_stages_own_timing(sd15, n, monkeypatch):
    """The prediction divides the sequential step by the stage times, so both come from one
    timing of one harness: the checked run of the stages (partition.verify). With a clock
    that ticks 1 ms per read, a stage costs 1 ms per segment, whatever the cost pass measured
    per node (their sum made N=1 with CFG-parallel predict 2.89x, ideal 2x); the sequential
    step is the stages' sum less the conditioning nodes computed by more than one stage,
    each extra copy at the cost model's time of it."""
    import collections
    import itertools

    import partition.verify
    from partition.report import predict

    ticks = itertools.count()
    monkeypatch.setattr(partition.verify, "host_clock",
                        lambda threads: lambda: next(ticks) * 1e-3)
    compiled = compile_model(sd15.bundle.module, sd15.bundle.specs, sd15.inputs,
                             PartitionRequest(n=n, refine=0), cost_model="time",
                             captured=sd15.captured, name="sd15/tiny")
    m = compiled.plan.measured
    segs = [len(compiled.staged.stage_segments(s)) for s in range(n)]
    assert m.source == m.step_source == "stages"
    assert m.stage_ms == tuple(pytest.approx(float(k)) for k in segs)
    copies = collections.Counter(c for seg in compiled.staged.segments
                                 for c in set(seg.conditioning))
    extra = sum(compiled.graph.costs.ms[c] * (k - 1) for c, k in copies.items())
    assert (extra > 0) == (n > 1)  # the tiny UNet's stages each recompute the time embedding
    assert m.total_ms == pytest.approx(sum(segs) - extra, abs=1e-3)
    assert m.total_ms != pytest.approx(sum(compiled.graph.costs.ms.values()))
    if n == 1:  # one stage is the whole forward: CFG-parallel predicts exactly its ideal
        p = predict(compiled.plan, steps=3, warmup=1, rounds=2, groups=2, comm=False)
        assert p["sequential_ms"] == pytest.approx(6.0)
        assert p["speedup"] <= p["ideal_speedup"]


def test_a_plan_whose_step_was_not_timed_with_its_stages_is_flagged(sd15, caplog):
    """A plan saved before the sequential step was timed beside the stages (its Measured has
    no step_source): predict says its speedup is too high, loudly."""
    from partition.report import predict

    plan = sd15.compile(PartitionRequest(n=2)).plan
    old = dataclasses.replace(plan, measured=Measured(stage_ms=(1.0, 1.0), total_ms=4.0,
                                                      threads=1, repeats=1, source="stages"))
    loaded = Plan.from_json(old.to_json())
    assert loaded.measured.step_source == "modules"
    with caplog.at_level("WARNING", logger="partition.report"):
        predict(loaded, steps=4)
    assert "predicted speedup is too high" in caplog.text
    caplog.clear()
    timed = dataclasses.replace(old.measured, step_source="stages")
    with caplog.at_level("WARNING", logger="partition.report"):
        predict(dataclasses.replace(old, measured=timed), steps=4)
    assert not caplog.text


# --------------------------------------------------------------------------- asyncdiff-plan


@pytest.mark.parametrize("name", model_params(zoo.model_names()))
def test_asyncdiff_plan_for_every_model(tiny, compose_cfg, reuse_capture, tmp_path, capsys, name):
    reuse_capture(name)
    cfg = compose_cfg(f"model={name}", "parallel.n=2", "partition.cost_model=flops",
                      "partition.repeats=0")
    compiled = experiments.plan.plan_from_config(cfg, tmp_path)
    text = (tmp_path / "plan.json").read_text()
    plan = Plan.from_json(text)
    assert plan == compiled.plan and plan.to_json() == text
    assert plan.model == f"{name}/tiny" and plan.n == 2 and plan.strategy == "balanced"
    assert plan.cost_model == "flops" and plan.measured is None
    t = tiny(name)
    assert plan.graph_hash == t.captured.graph_hash()
    assert plan.config_hash == t.bundle.architecture
    out = capsys.readouterr().out
    assert f"plan for {name}/tiny: N=2" in out and "wrote" in out
    # the same request made directly gives the same plan (the command line's partition
    # group: its deepening included)
    request = experiments.common.partition_request(OmegaConf.to_container(cfg.partition), 2)
    assert request.deepen == cfg.partition.deepen and request.target == cfg.partition.target
    assert plan.to_json(measured=False) == t.compile(request).plan.to_json(measured=False)
    with torch.no_grad():
        assert torch.equal(compiled.staged.run(t.env), t.eager)


def test_asyncdiff_plan_entry_point(tmp_path, monkeypatch, capsys):
    """The installed command (Hydra's main): writes plan.json; a bad value exits with code 2
    and one line naming the key and the allowed values."""
    args = ["asyncdiff-plan", "model=dit", "parallel.n=3", "partition.cost_model=flops",
            "partition.repeats=0", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", [*args, f"hydra.run.dir={tmp_path}"])
    experiments.plan.main()
    plan = Plan.from_json((tmp_path / "plan.json").read_text())
    assert plan.n == 3 and plan.model == "dit/tiny"
    monkeypatch.setattr(sys, "argv", [*args, "partition.strategy=greedy",
                                      f"hydra.run.dir={tmp_path / 'bad'}"])
    with pytest.raises(SystemExit) as info:
        experiments.plan.main()
    assert info.value.code == 2
    assert re.search(r"^error: \S*strategy='greedy'; allowed: balanced", capsys.readouterr().err)
    assert not (tmp_path / "bad" / "plan.json").exists()
