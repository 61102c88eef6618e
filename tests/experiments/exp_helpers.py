"""Helpers shared by the experiments tests (not a conftest: ``from conftest import`` is taken
by the runtime tests). Tiny models, few steps, flops cost model, W&B off unless a test says."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from experiments.common import CONF_DIR

REPO = Path(CONF_DIR).parent
FAST = ["scheduler.steps=4", "partition.cost_model=flops", "partition.repeats=0",
        "wandb.mode=disabled", "progress=false"]
# sd3's tiny MMDiT captures in ~2 s (the tiny UNets take ~6 s) and has no output adapter
MODEL = "model=sd3"


def compose_cfg(*overrides: str, hydra_node: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides),
                       return_hydra_config=hydra_node)


def env(**extra: str) -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out.update(extra)
    return out


# what the asyncdiff-run console script runs (experiments.cli.run_main), without needing the
# script on PATH
RUN_MAIN = [sys.executable, "-c",
            "import sys; sys.argv[0] = 'asyncdiff-run'; from experiments.cli import run_main; "
            "run_main()"]


def popen(args: list[str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=env(**extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
