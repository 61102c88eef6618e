"""asyncdiff-run pipeline=…: a saved tiny pipeline, prompts to decoded images, both runs.

The checkpoint is a complete tiny ``StableDiffusionPipeline`` (text encoder, tokenizer, UNet,
VAE; random weights) written with ``save_pretrained`` (``tests/checkpoints.py``); the run
loads it with ``local_files_only=True``, self-spawns the ranks of the distributed drop-in
and compares with the plain pipeline from the same seeds.
"""
from __future__ import annotations

import json

import pytest
import torch

import checkpoints  # tests/checkpoints.py (tests/ is on the path: tests/conftest.py)
from experiments.cli import check_command_line
from experiments.common import ConfigError


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return checkpoints.save("sd15", tmp_path_factory.mktemp("ckpt"))


def _args(path, *extra):
    px = checkpoints.pixels()
    return ["pipeline=sd15", f"pipeline.path={path}", f"pipeline.height={px}",
            f"pipeline.width={px}", "pipeline.warm_call=false", "wandb.mode=disabled",
            *extra]


def test_warmup_through_every_step_gives_the_sequential_images(sd15, tmp_path, monkeypatch):
    """W = T: every step sequential on the distributed drop-in, so the decoded images equal
    the plain pipeline's bit for bit; the run directory holds PNGs, grid, plan, metrics."""
    import subprocess
    import sys

    torch.set_num_threads(1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", *_args(sd15, "scheduler.steps=3",
           "parallel.n=2", "parallel.warmup=3", "parallel.threads=1",
           "pipeline.seeds=[0,1]", f"hydra.run.dir={out}")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["identical"] is True and metrics["items"] == 2
    assert metrics["devices"] == 2 and metrics["plan_hash"]
    assert metrics["lpips"].startswith("skipped") or isinstance(metrics["lpips"], float)
    saved = torch.load(out / "images.pt")
    assert torch.equal(saved["sequential"], saved["asyncdiff"])
    assert saved["sequential"].shape == (2, 3, checkpoints.pixels(), checkpoints.pixels())
    for name in ("grid.png", "sequential/000.png", "asyncdiff/001.png"):
        assert (out / "images" / name).is_file()


@pytest.mark.parametrize("extra, message", [
    (("pipeline.path=/nonexistent/ckpt",), "pipeline.path='/nonexistent/ckpt': no diffusers"),
    (("pipeline.cls=StableDiffusionXLPipeline",),
     "pipeline.cls='StableDiffusionXLPipeline' does not match"),
    (("pipeline.prompt_file=/nonexistent/prompts.txt",),
     "pipeline.prompt_file='/nonexistent/prompts.txt': no such file"),
    (("parallel.replicas=2",), "parallel.replicas=2; allowed: 1"),
])
def test_bad_pipeline_input_is_one_config_error(sd15, extra, message):
    args = _args(sd15)
    args = [a for a in args if not a.startswith("pipeline.path")] if "pipeline.path" in \
        extra[0] else args
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_command_line([*args, *extra])


def test_bad_pipeline_input_exits_2_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "experiments.run", "pipeline=sd15",
                           f"pipeline.path={tmp_path / 'missing'}", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "pipeline.path=" in done.stderr
    assert not out.exists()
