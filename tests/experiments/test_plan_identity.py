"""One split, one plan: the paper's SD 1.5 split compiled by the command line
(``asyncdiff-plan model=sd15 partition=paper_sd15_n3``) and by the drop-in on a pipeline whose
UNet has the same config (``split="paper_sd15_n3"``) is the same plan, hash and all. The
plan's ``config_hash`` is the model's class and config either way, and its name is a label
outside the hash."""
from __future__ import annotations

import pytest
import torch

import asyncdiff
import experiments.plan
import pipelines as P  # tests/pipelines.py (tests/ is on the path: tests/conftest.py)
from exp_helpers import compose_cfg
from experiments.schema import register


@pytest.mark.slow
def test_the_command_line_and_the_dropin_give_one_plan(tmp_path):
    torch.set_num_threads(1)
    pipe = P.PIPELINES["sd15"].build()
    pipe.set_progress_bar_config(disable=True)
    handle = asyncdiff.parallelize(pipe, split="paper_sd15_n3")
    P.PIPELINES["sd15"].call(pipe, 2)
    dropin = next(iter(handle.sessions.values())).plan
    # the pipeline feeds int64 timesteps, at its guidance batch and prompt length
    register()
    cfg = compose_cfg("model=sd15", "partition=paper_sd15_n3", "+model.tiny.inputs.1.dtype=int64",
                      "wandb.mode=disabled")
    cli = experiments.plan.plan_from_config(cfg, tmp_path).plan
    assert dropin.model == "UNet2DConditionModel" and cli.model == "sd15/tiny"
    assert [s.to_dict() for s in dropin.inputs] == [s.to_dict() for s in cli.inputs]
    assert dropin.to_json(measured=False) == cli.to_json(measured=False)
    assert dropin.plan_hash == cli.plan_hash
    assert dropin.verification.startswith("exact") and cli.verification.startswith("exact")
