"""asyncdiff-run pipeline=…: a saved tiny pipeline, prompts to decoded images, both runs.

The checkpoint is a complete tiny ``StableDiffusionPipeline`` (text encoder, tokenizer, UNet,
VAE; random weights) written with ``save_pretrained`` (``experiments/checkpoints.py``); the run
loads it with ``local_files_only=True``, self-spawns (or torchrun starts) the ranks of the
distributed drop-in and compares with the plain pipeline from the same seeds. Every class of
``conf/pipeline`` through the ranks' path: test_pipeline_classes.py.
"""
from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch

from exp_helpers import compose_cfg

from experiments import checkpoints
from experiments.checks import resolved
from experiments.cli import check_command_line
from experiments.common import ConfigError


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return checkpoints.save("sd15", tmp_path_factory.mktemp("ckpt"))


def _args(path, *extra):
    px = checkpoints.PIXELS
    return ["pipeline=sd15", f"pipeline.path={path}", f"pipeline.height={px}",
            f"pipeline.width={px}", "pipeline.warm_call=false", "wandb.mode=disabled",
            *extra]


@pytest.mark.slow
def test_a_warmup_sweep_ends_with_sequential_images_at_w_equal_t(sd15, tmp_path):
    """A Hydra multirun over W (self-spawned ranks, the denoiser loaded lazily): at W = T
    every step is sequential, so the decoded images equal the plain pipeline's bit for bit;
    at W = 1 they differ. Each job directory holds PNGs, grid, plan and metrics; the sweep
    ends with one results table."""
    import csv
    import subprocess
    import sys

    torch.set_num_threads(1)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments.run", "-m", *_args(sd15, "scheduler.steps=3",
           "parallel.n=2", "parallel.warmup=1,3", "parallel.threads=1",
           "pipeline.seeds=[0,1]", f"hydra.sweep.dir={sweep}")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(sweep / "results.csv") as f:
        rows = {int(r["warmup"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [1, 3] and rows[3]["identical"] == "True"
    assert rows[1]["identical"] == "False" and float(rows[1]["psnr_db"]) > 0
    for job, warmup in ((0, 1), (1, 3)):
        out = sweep / str(job)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["warmup"] == warmup and metrics["items"] == 2
        assert metrics["devices"] == 2 and metrics["plan_hash"]
        assert metrics["lpips"].startswith("skipped") or isinstance(metrics["lpips"], float)
        saved = torch.load(out / "images.pt")
        assert torch.equal(saved["sequential"], saved["asyncdiff"]) == (warmup == 3)
        assert saved["sequential"].shape == (2, 3, checkpoints.PIXELS, checkpoints.PIXELS)
        assert "loaded lazily" in json.loads((out / "plan.json").read_text())["verification"]
        for name in ("grid.png", "sequential/000.png", "asyncdiff/001.png"):
            assert (out / "images" / name).is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_pipeline_run_equals_the_emulator(tmp_path):
    """``torchrun -m experiments.run pipeline=…``: every rank loads lazily and runs the same
    calls (SPMD); rank 0 records. Its images equal the emulator's on the whole pipeline."""
    import os
    import subprocess
    import sys

    from asyncdiff import parallelize
    from experiments.generate import generate, load, request
    from experiments.pipeline_run import dropin_options
    from experiments.schema import register
    from partition.threads import intra_op_threads

    path = checkpoints.save("flux", tmp_path / "ckpt")
    args = ["pipeline=flux", f"pipeline.path={path}", f"pipeline.height={checkpoints.PIXELS}",
            f"pipeline.width={checkpoints.PIXELS}", "pipeline.warm_call=false",
            "scheduler.steps=3", "parallel.n=2", "parallel.warmup=1", "parallel.threads=1"]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_DIR": str(tmp_path / "wb")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           "-m", "experiments.run", *args, "wandb.mode=offline", f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    register()
    cfg = resolved(compose_cfg(*args, "wandb.mode=disabled"), "run")
    req = request(cfg)
    with intra_op_threads(1):
        pipe = load(req)
        parallelize(pipe, mode="emulate", **dropin_options(cfg))
        want = generate(pipe, req)[0]
    assert torch.equal(torch.load(out / "images.pt")["asyncdiff"], want)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["devices"] == 2 and not metrics["identical"]
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("extra, message", [
    (("pipeline.path=/nonexistent/ckpt",), "pipeline.path='/nonexistent/ckpt': no diffusers"),
    (("pipeline.cls=StableDiffusionXLPipeline",),
     "pipeline.cls='StableDiffusionXLPipeline' does not match"),
    (("pipeline.prompt_file=/nonexistent/prompts.txt",),
     "pipeline.prompt_file='/nonexistent/prompts.txt': no such file"),
    (("parallel.replicas=2",), "parallel.replicas=2; allowed: 1"),
    (("partition.cost_model=time",), "partition.cost_model='time' with pipeline.load=lazy; "
     "allowed: flops"),
    # the checkpoint's own scheduler: DDIM with steps_offset=1 (tests/pipelines.py)
    (("scheduler.steps=1000",), "scheduler.steps=1000; allowed: an integer in [1, 999] "
     "(DDIMScheduler: at 1000 steps its step indexes past"),
])
def test_bad_pipeline_input_is_one_config_error(sd15, extra, message):
    args = _args(sd15)
    args = [a for a in args if not a.startswith("pipeline.path")] if "pipeline.path" in \
        extra[0] else args
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_command_line([*args, *extra])


@pytest.mark.slow
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


def test_loading_passes_the_libraries_current_arguments(sd15, caplog, recwarn):
    """Whole and lazily loaded, the checkpoint loads without a deprecation said by diffusers
    or transformers (as a warning or in their logs): ``dtype``, not ``torch_dtype``, and no
    cast of the lazy denoiser to the dtype it has (diffusers warns at every cast)."""
    import logging

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from experiments.generate import load, request
    from experiments.schema import register

    register()
    req = request(resolved(compose_cfg(*_args(sd15, "pipeline.dtype=float32")), "run"))
    dlog.enable_propagation()  # their loggers write to stderr themselves: to caplog too
    tlog.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            whole, lazy = load(req), load(req, lazy=True)
    finally:
        dlog.disable_propagation()
        tlog.disable_propagation()
    said = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "deprecat" in m.lower() or "torch_dtype" in m], said
    assert whole.unet.dtype == torch.float32 and type(lazy) is type(whole)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_each_generation_is_named_on_a_terminal_and_silent_in_a_log(sd15, monkeypatch):
    """diffusers' own bars, named by the generation, where stderr is a terminal; loading's
    bars and the sampling's write nothing into a log file."""
    from experiments.generate import generate, load, request
    from experiments.schema import register

    from partition.threads import intra_op_threads

    register()
    req = request(resolved(compose_cfg(*_args(sd15, "scheduler.steps=2")), "run"))
    with intra_op_threads(1):
        monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
        generate(load(req), req, "2/4 plain pipeline, timed call")
        # no bar ("NN%|…|"); a library's log lines may still be there
        assert "%|" not in sys.stderr.getvalue()
        monkeypatch.setattr(sys, "stderr", Terminal())
        generate(load(req), req, "2/4 plain pipeline, timed call")
        drawn = sys.stderr.getvalue()
    assert "Loading pipeline components" in drawn and "%|" in drawn
    assert "2/4 plain pipeline, timed call, item 1/1" in drawn and "/2 [" in drawn


@pytest.mark.parametrize("warm, torchrun, names", [
    (True, False, ["plain pipeline, warm-up call", "plain pipeline, timed call",
                   "asyncdiff, warm-up call", "asyncdiff, timed call"]),
    (False, False, ["plain pipeline, timed call", "asyncdiff, timed call"]),
    (True, True, ["asyncdiff, warm-up call", "asyncdiff, timed call",
                  "plain pipeline, warm-up call", "plain pipeline, timed call"]),
])
def test_the_log_says_which_generations_a_run_makes(sd15, caplog, warm, torchrun, names):
    import logging

    from experiments.pipeline_run import announce, generations
    from experiments.schema import register

    register()
    cfg = resolved(compose_cfg(*_args(sd15, f"pipeline.warm_call={str(warm).lower()}",
                                      "pipeline.seeds=[0,1]")), "run")
    assert generations(cfg, torchrun) == names
    with caplog.at_level(logging.INFO, logger="experiments.pipeline_run"):
        announce(cfg, torchrun)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"pipeline run: {len(names)} generations")
    assert all(f"{i}. {n}" in line for i, n in enumerate(names, 1)) and "2 item(s)" in line
    assert ("pipeline.warm_call=false skips" in line) == warm


def test_time_limits_come_from_the_timed_plain_step(sd15):
    """Self-spawned, each wait for a peer may take 10× a step of the plain pipeline timed
    first (at least 30 s); a configured limit wins. (Under torchrun no step is timed before
    the ranks start: the drop-in derives the limit from its plan, asyncdiff/dropin.)"""
    from experiments.pipeline_run import _limits
    from experiments.schema import register

    register()
    cfg = resolved(compose_cfg(*_args(sd15, "scheduler.steps=4", "pipeline.seeds=[0,1]")),
                   "run")
    steps = 2 * 4
    assert _limits(cfg, 0.5) == (30.0, 120.0 + steps * 30.0)
    assert _limits(cfg, 20.0) == (200.0, 120.0 + steps * 200.0)
    cfg["parallel"].update(step_timeout_s=7.0, run_timeout_s=99.0)
    assert _limits(cfg, 20.0) == (7.0, 99.0) == _limits(cfg, 0.5)
