"""Multi-node on one machine: two torchrun agents (``--nnodes=2``, c10d rendezvous on
127.0.0.1) run one N = 3 job; its result equals the emulator bit for bit, and each rank
takes its place on its node (its device) from ``LOCAL_RANK``."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from test_run import emulated

OVERRIDES = ["model=sd3", "parallel.n=3", "parallel.stride=2", "scheduler.steps=5",
             "partition.cost_model=flops", "partition.repeats=0", "progress=false",
             "wandb.mode=disabled", "save_images=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_torchrun_agents_run_one_job_equal_to_the_emulator(tmp_path):
    _, want = emulated(OVERRIDES)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
         "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=asyncdiff-multinode", "-m", "experiments.run", *OVERRIDES,
         f"hydra.run.dir={out}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for node in (0, 1)]
    try:
        logs = [a.communicate(timeout=360) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in logs]
    assert torch.equal(torch.load(out / "result_replica0.pt"), want)
    rows = json.loads((out / "timeline.json").read_text())
    local = {r["rank"]: r["local_rank"] for r in rows}
    assert sorted(local) == [0, 1, 2, 3]
    # two ranks on each node, numbered 0 and 1 there: the device slot is the local rank
    assert sorted(local.values()) == [0, 0, 1, 1]
    assert all(r["torch_device"] == "cpu" for r in rows)


def test_a_rank_takes_its_gpu_from_local_rank(monkeypatch):
    """Under nccl, global rank 3 on the second node with LOCAL_RANK=1 runs on cuda:1 (its
    place on its node), not cuda:3; under gloo every rank runs on the CPU."""
    from asyncdiff.distributed.worker import placement, rank_device
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("nccl", 3) == torch.device("cuda", 1)
    assert rank_device("gloo", 3) == torch.device("cpu")
    assert placement("nccl", 3)["torch_device"] == "cuda:1"
    assert placement("nccl", 3)["local_rank"] == 1
