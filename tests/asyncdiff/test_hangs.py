"""A rank that stops (SIGSTOP: it neither answers nor dies) ends every rank within the limit,
named, with no process left behind: under the self-spawning launcher and under torchrun, at
start-up (before the first step: ``parallel.startup_timeout_s``) and in the sampling loop
(``parallel.step_timeout_s``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import compiled, cond_and_noise

from asyncdiff.distributed.launch import WorkerError, launch
from asyncdiff.distributed.limits import Limits
from asyncdiff.distributed.worker import FAULT_ENV, SamplingJob
from asyncdiff.schedule import Schedule

LIMIT_S = 10.0
LIMITS = Limits(step_s=LIMIT_S, startup_s=LIMIT_S)
# start-up of the workers and of the model (torchrun: each rank builds and captures it),
# then the teardown; generous for a loaded 2-core machine
MARGIN_S = 45.0


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] != "Z":
                    out.append(pid)
        except FileNotFoundError:
            continue
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("at", ["start", 2])
def test_a_stopped_rank_ends_a_self_spawned_run(at):
    c = compiled(3)
    cond, x = cond_and_noise()
    par = Schedule(n=3)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1") as err:
        launch(c.staged, c.plan, par, [SamplingJob("ddim", 8, x, cond)], limits=LIMITS,
               fault={"rank": 1, "at": at, "kind": "stop"})
    took = time.monotonic() - t0
    assert LIMIT_S <= took < LIMIT_S + MARGIN_S, took
    assert str(err.value).startswith("rank 1 stopped answering (put down by rank ")
    assert ("did not reach the plan check" if at == "start" else "no answer from rank 1") in \
        str(err.value)
    assert not _alive(err.value.pids)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_hung_rank_at_start_up_is_named_alive_and_the_run_ends():
    """A rank that hangs (sleeps: its heartbeat goes on) before the first step: the others
    wait at their meeting point no longer than the start-up limit, name it as alive but
    hung, and the run ends with every process gone."""
    c = compiled(3)
    cond, x = cond_and_noise()
    par = Schedule(n=3)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 did not reach the plan check within 10 s "
                                          r".*alive, but busy or hung") as err:
        launch(c.staged, c.plan, par, [SamplingJob("ddim", 8, x, cond)], limits=LIMITS,
               fault={"rank": 1, "at": "start", "kind": "hang"})
    assert LIMIT_S <= time.monotonic() - t0 < LIMIT_S + MARGIN_S
    assert not _alive(err.value.pids)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_stopped_rank_is_named_not_the_live_one_waiting_on_it():
    """A chain (the DiT: no skip connection) at N = 3 with W = 2: rank 0 stops in the second
    warm-up round; rank 1 waits on it, rank 2 on rank 1. Rank 2 finds rank 1 alive and
    leaves it; rank 0, silent, is put down and named."""
    from experiments import zoo
    from partition import PartitionRequest, compile_model

    bundle = zoo.build(zoo.load_yaml("dit"), seed=0)
    inputs = bundle.inputs(0)
    c = compile_model(bundle.module, bundle.specs, inputs, PartitionRequest(n=3),
                      contract=bundle.contract)
    assert not any(len(v.consumers) > 1 or v.consumers[0] != v.producer + 1
                   for v in c.plan.values)  # a chain
    cond = {s.name: inputs[s.name] for s in bundle.specs if s.role == "cond"}
    par = Schedule(n=3, warmup=2)
    with pytest.raises(WorkerError) as err:
        launch(c.staged, c.plan, par, [SamplingJob("ddim", 6, inputs[bundle.latent], cond)],
               limits=LIMITS, fault={"rank": 0, "at": 1, "kind": "stop"})
    assert str(err.value).startswith("rank 0 stopped answering (put down by rank 1: no answer "
                                     "in round 1 fresh 0)"), str(err.value)
    assert not _alive(err.value.pids)


TORCHRUN = ["model=sd3", "parallel.n=2", "parallel.stride=2", "scheduler.steps=8",
            "partition.cost_model=flops", "partition.repeats=0", "progress=false",
            "wandb.mode=disabled", "save_images=false", f"parallel.step_timeout_s={LIMIT_S}",
            f"parallel.startup_timeout_s={LIMIT_S}"]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("at", ["build", 2])
def test_a_stopped_rank_ends_a_torchrun_job(tmp_path, at):
    """Rank 1 stops itself while the model is built (start-up) or at round 2 (the loop): the
    rank waiting on it names it, the job ends, and no worker is left (torchrun alone would
    wait 30 s more for the stopped one: it keeps SIGTERM pending)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           FAULT_ENV: json.dumps({"rank": 1, "at": at, "kind": "stop"})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3", "--standalone",
           "-m", "experiments.run", *TORCHRUN, f"hydra.run.dir={out}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    named = "rank 1 did not reach capture" if at == "build" else "no answer from rank 1"
    assert named in proc.stderr, proc.stderr[-3000:]
    assert LIMIT_S <= took < LIMIT_S + MARGIN_S, took
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={out}"], capture_output=True,
                          text=True).stdout.split()
    assert not _alive([int(p) for p in left])
