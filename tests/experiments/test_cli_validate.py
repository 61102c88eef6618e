"""Config composition and bad input: one line naming the key and the allowed values, exit
code 2, and nothing written (the command line is checked before Hydra makes a directory).

Planning every model from its composed config is tests/partition/test_plan.py
(test_asyncdiff_plan_for_every_model); here every model config composes and validates.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from exp_helpers import FAST, RUN_MAIN, compose_cfg, popen

import schedulers
from experiments import cli
from experiments.common import CONF_DIR, ConfigError, plain
from asyncdiff.distributed.limits import Limits
from experiments.checks import check_backend, check_config
from experiments import zoo

EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", zoo.model_names())
def test_every_model_composes_and_validates(name):
    cfg = plain(compose_cfg(f"model={name}"))
    assert cfg["model"]["name"] == name and cfg["model"]["variant"] == "tiny"
    check_config(cfg, env={})


def test_scheduler_configs_are_the_schedulers():
    names = [p.stem for p in Path(CONF_DIR, "scheduler").glob("*.yaml")]
    assert sorted(names) == sorted(schedulers.SCHEDULERS)
    for name in schedulers.SCHEDULERS:
        cfg = compose_cfg(f"scheduler={name}")
        assert cfg.scheduler.name == name and cfg.scheduler.guidance is None
        check_config(plain(cfg), env={})


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweeps_expand_and_validate(name):
    configs = cli.job_configs([f"+experiment={name}"], multirun=True)
    if name.startswith(("quality_", "frontier")):  # the study's points (experiments/study.py)
        from experiments import study
        full = cli.job_configs([f"+experiment={name}"], False, "study")[0]
        params = full.hydra.sweeper.params
        cfg = OmegaConf.create(cli.resolved_job(full))
        points = study.points_of(cfg, params) if (params or cfg.study.points) else []
        assert points or cfg.study.similarity
        assert len({json.dumps(study.describe(study.point_config(cfg, p)))
                    for p in points}) == len(points)  # each valid, none twice
        return
    params = dict(configs[0].hydra.sweeper.params)
    assert {"parallel.stride", "parallel.warmup"} <= set(params)
    assert "parallel.n" in params or "partition" in params  # paper splits set N themselves
    want = 1
    for v in params.values():
        want *= len(str(v).split(","))
    assert len(configs) == want > 1
    for cfg in configs:
        check_config(cli.resolved_job(cfg), env={})


def test_stride_warmup_is_a_2x2x2_sweep():
    params = compose_cfg("+experiment=stride_warmup", hydra_node=True).hydra.sweeper.params
    points = cli.sweep_points([], params)
    assert len(points) == 8
    assert ["parallel.n=3", "parallel.stride=2", "parallel.warmup=3"] in points
    # the command line wins over the experiment's params (as in Hydra's basic sweeper)
    points = cli.sweep_points(["parallel.stride=1", "parallel.n=2,3,4"], params)
    assert len(points) == 6 and all("parallel.stride=1" in p for p in points)


def test_launcher_configs_compose_without_the_plugin():
    basic = compose_cfg("hydra/launcher=basic", hydra_node=True).hydra.launcher
    assert basic._target_.endswith("BasicLauncher")
    slurm = compose_cfg("hydra/launcher=submitit_slurm", hydra_node=True).hydra.launcher
    assert slurm._target_ == ("hydra_plugins.hydra_submitit_launcher.submitit_launcher."
                              "SlurmLauncher")
    assert slurm.tasks_per_node == 1 and slurm.gpus_per_node >= 1
    assert slurm.submitit_folder.endswith("/.submitit/%j")
    text = Path(CONF_DIR, "hydra", "launcher", "submitit_slurm.yaml").read_text()
    assert "pip install hydra-submitit-launcher" in text and yaml.safe_load(text)


def test_sweep_summary_callback_is_registered():
    cb = compose_cfg(hydra_node=True).hydra.callbacks.sweep_summary
    assert cb._target_ == "experiments.sweep.SweepSummary"


# --------------------------------------------------------------------------- bad input


def broken_model_dir(tmp_path: Path) -> Path:
    """A user's own model YAML, missing its builder, in an extra config search path."""
    d = tmp_path / "conf" / "model"
    d.mkdir(parents=True)
    cfg = zoo.load_yaml("sd3")
    del cfg["builder"]
    (d / "broken.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "conf"


BAD = [
    # (overrides, the one line's expected text)
    (["model=xyz"], f"model=xyz: unknown; allowed: {', '.join(zoo.model_names())}\n"),
    (["scheduler=foo"], "scheduler=foo: unknown; allowed: ddim, dpmsolver++, euler"),
    (["scheduler.name=foo"], "scheduler.name='foo'; allowed: ddim, dpmsolver++, euler"),
    (["parallel.n=0"], "parallel.n=0; allowed: an integer >= 1"),
    (["parallel.stride=0"], "parallel.stride=0; allowed: an integer >= 1"),
    (["parallel.warmup=-1"], "parallel.warmup=-1; allowed: an integer >= 1 when n > 1 (the "
                             "last warm-up step seeds the stale cross-stage values)"),
    (["parallel.warmup=5"], "parallel.warmup=5; allowed: an integer in [1, 4] when n > 1"),
    (["parallel.n=1", "parallel.warmup=-1"], "parallel.warmup=-1; allowed: an integer >= 0\n"),
    (["parallel.cooldown=-1"], "parallel.cooldown=-1; allowed: an integer >= 0"),
    (["parallel.warmup=2", "parallel.cooldown=3"],
     "parallel.cooldown=3; allowed: an integer in [0, 2] (warm-up + cool-down <= T = 4; W = 2)"),
    (["parallel.sync=[0]"], "parallel.sync=[0]; allowed: step indices >= warmup=1 (the steps "
                            "between warm-up and cool-down run sequential too)"),
    (["parallel.sync=[3]", "parallel.cooldown=1"],
     "parallel.sync=3; allowed: an integer in [1, 2] (steps between warm-up and cool-down: "
     "W = 1, T − C = 3)"),
    (["parallel.nn=3"], "parallel.nn: unknown key; allowed: n, stride, warmup, cooldown, "
                        "sync, time_shift, "
                        "stride_noise, backend, threads, replicas, cfg_parallel, "
                        "cache_interval, step_timeout_s, "
                        "run_timeout_s, startup_timeout_s"),
    (["parallel.cfg_parallel=true"], "parallel.cfg_parallel=true without guidance; allowed: a "
                                     "guidance scale (scheduler.guidance=7.5), or "
                                     "parallel.cfg_parallel=false"),
    (["parallel.cache_interval=-1"], "parallel.cache_interval=-1; allowed: an integer >= 0 "
                                     "(0: no step cache)"),
    (["parallel.cache_interval=2"], "partition.strategy='balanced' with cache_interval=2; "
                                    "allowed: 'shell_core' (the step cache reruns the last "
                                    "stage every step"),
    (["parallel.cache_interval=2", "partition=shell_core", "parallel.cooldown=1"],
     "parallel.cooldown=1 with cache_interval=2; allowed: 0 (the step cache is its own "
     "schedule, on one device)"),
    (["parallel.cache_interval=9"], "parallel.cache_interval=9; allowed: an integer in [1, 4]"),
    (["parallel.cache_interval=2", "partition=shell_core"],
     "parallel.cache_interval=2: the step cache runs on one device in the study's emulator "
     "(a point of python -m experiments.study); allowed with asyncdiff-run: 0"),
    (["parallel.step_timeout_s=-5"],
     "parallel.step_timeout_s=-5.0; allowed: a number of seconds > 0, or null"),
    (["parallel.stride_noise=official", "parallel.stride=3"],
     "parallel.stride=3 with stride_noise='official'; allowed: 1, 2"),
    (["parallel.n=abc"], "parallel.n='abc'; allowed: an integer"),
    (["partition.strategy=xyz"],
     "partition.strategy='xyz'; allowed: balanced, equal_blocks, manual, shell_core"),
    (["parallel.time_shift=maybe"], "parallel.time_shift='maybe'; allowed: true, false"),
    (["~model.builder"], "model.builder: ModelConf (DictConfig) does not support deletion"),
    (["~model.tiny.inputs"], "model.tiny: missing required key 'inputs'"),
    (["model=flux", "scheduler.guidance=3"], "scheduler.guidance=3.0: model flux input"),
    (["scheduler.guidance=abc"], "scheduler.guidance='abc'; allowed: a number"),
    (["scheduler.guidance=-1"], "scheduler.guidance=-1.0; allowed: null or a number >= 0"),
    (["wandb.mode=cloud"], "wandb.mode='cloud'; allowed: offline, online, disabled"),
    (["batch=0"], "batch=0; allowed: an integer >= 1"),
    (["partition.device=tpu"], "partition.device='tpu'; allowed: cpu, cuda"),
    (["partition.refine=-1"], "partition.refine=-1; allowed: an integer >= 0"),
    (["partition.deepen=1.5"], "partition.deepen='1.5'; allowed: an integer"),
    (["partition.target=0.5"], "partition.target=0.5; allowed: a number >= 1"),
    (["labels=[1,2]"], "labels=[1, 2]; allowed: null for model sd15 (class labels condition"),
    (["model=digits", "labels=[3,12]"],
     "labels=[3, 12]; allowed: null or a list of class labels in [0, 9]"),
    (["+experiment=nope"], f"experiment=nope: unknown; allowed: {', '.join(EXPERIMENTS)}\n"),
    # the scheduler's own limit (schedulers.factory.steps_problem): DDIM and DPM-Solver++ with
    # steps_offset=1 stop one short of their 1000 training timesteps, Euler does not
    (["scheduler.steps=4000"], "scheduler.steps=4000; allowed: an integer in [1, 999] "
                               "(DDIMScheduler: 4000 is more than its 1000 training timesteps;"),
    (["scheduler.steps=1000"], "scheduler.steps=1000; allowed: an integer in [1, 999] "
                               "(DDIMScheduler: at 1000 steps its step indexes past"),
    (["scheduler=dpmsolver++", "scheduler.steps=1000"],
     "scheduler.steps=1000; allowed: an integer in [1, 999] (DPMSolverMultistepScheduler: at "
     "1000 steps its timesteps repeat"),
    (["scheduler=euler", "scheduler.steps=1001"],
     "scheduler.steps=1001; allowed: an integer in [1, 1000] (EulerDiscreteScheduler: 1001 is "
     "more than its 1000 training timesteps)"),
    (["model=digits", "scheduler.steps=1000"], "scheduler.steps=1000; allowed: an integer in "
                                               "[1, 999]"),
    # a key of a group left at null: Hydra's merge would fail with an assertion
    (["pipeline.path=/tmp/ckpt"], "pipeline.path=/tmp/ckpt: no pipeline chosen; allowed: "
                                  "pipeline=NAME before it (NAME: animatediff, flux, pixart, "
                                  "sd15, sd21, sd3, sdxl, svd)"),
    (["-m", "parallel.n=2", "parallel.warmup=1,7"], "parallel.warmup=7; allowed"),
    (["-m", "pipeline.path=/tmp/a,/tmp/b"], "pipeline.path=/tmp/a: no pipeline chosen"),
    (["-m", "hydra/launcher=submitit_slurm", "parallel.n=2,3"],
     "hydra/launcher=submitit_slurm: needs hydra_plugins.hydra_submitit_launcher"),
]


def _args(overrides, tmp_path):
    flags = [o for o in overrides if o.startswith("-")]  # argparse: flags before overrides
    rest = [o for o in overrides if not o.startswith("-")]
    return [*flags, *FAST, *rest, f"hydra.run.dir={tmp_path / 'run'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_exit_2(overrides, message, tmp_path, capsys):
    if "submitit" in message and cli.importlib.util.find_spec("hydra_plugins") is not None:
        pytest.skip("a hydra plugin is installed here")
    # the check every entry point runs before Hydra starts (the real command lines:
    # test_bad_input_subprocesses)
    with pytest.raises(SystemExit) as exc:
        cli.check_or_exit(_args(overrides, tmp_path), "run")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir()), "nothing may be written"


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="GPUs for every rank are here")
def test_nccl_without_a_gpu_per_rank_is_bad_input():
    cfg = plain(compose_cfg(*FAST, "parallel.backend=nccl"))
    with pytest.raises(ConfigError, match=r"^parallel.backend=nccl needs one GPU per local rank "
                                          r"\(2 ranks, [01] GPU\(s\) here\); allowed: gloo, auto$"):
        check_config(cfg, env={})
    assert check_backend("auto", 2, {}) == "gloo"
    assert check_backend("auto", 2, {"LOCAL_WORLD_SIZE": "1"}) == (
        "nccl" if torch.cuda.is_available() else "gloo")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_profiling_on_a_missing_gpu_is_bad_input():
    cfg = plain(compose_cfg(*FAST, "partition.device=cuda"))
    with pytest.raises(ConfigError, match=r"^partition.device=cuda: no CUDA device here; "
                                          r"allowed: cpu$"):
        check_config(cfg, env={})


def test_world_size_must_be_replicas_times_devices():
    par = {"n": 3, "stride": 2, "warmup": 1, "stride_noise": "fresh", "time_shift": False,
           "backend": "gloo", "threads": 1, "replicas": 2}
    cfg = plain(compose_cfg(*FAST))
    cfg["parallel"] = par
    check_config(cfg, env={"RANK": "0", "WORLD_SIZE": "8"})
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=6 .*allowed: .* = 8 \(N=3 S=2 W=1 "
                                          r"2 replicas\)$"):
        check_config(cfg, env={"RANK": "0", "WORLD_SIZE": "6"})
    check_config(cfg, env={"WORLD_SIZE": "6"})  # not under torchrun: not checked
    cfg["parallel"] = {**par, "cfg_parallel": True}  # a group per guidance half
    cfg["scheduler"]["guidance"] = 3.0
    check_config(cfg, env={"RANK": "0", "WORLD_SIZE": "16"})
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=8 .*groups.* = 2 × 2 × 4 = 16 .*CFG-parallel"):
        check_config(cfg, env={"RANK": "0", "WORLD_SIZE": "8"})
    with pytest.raises(ConfigError, match=r"cfg_parallel=true with asyncdiff-bench; allowed: "
                                          r"false \(CFG-parallel runs in asyncdiff-run"):
        check_config(cfg, env={}, entry="bench")


def test_workers_that_oversubscribe_the_cores_are_named_in_one_warning(caplog, monkeypatch):
    """More ranks × threads than the cores this process may use: accepted (a pipeline can be
    tried on a small machine), with one line saying so when the run's workers are set."""
    import logging

    from asyncdiff.schedule import Schedule
    from experiments.build import workers
    from experiments.checks import usable_cores

    cores = usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    # the plan only sizes the time limits here
    monkeypatch.setattr("experiments.build.limits.derive", lambda *a, **k: Limits())
    par, plan = {"backend": "gloo", "threads": 1}, object()
    with caplog.at_level(logging.WARNING, logger="experiments.build"):
        workers(par, Schedule(n=cores + 1), plan, steps=4)
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(said) == 1 and said[0].startswith(
            f"{cores + 1} ranks × 1 thread = {cores + 1} threads on {cores} core"), said
        caplog.clear()
        workers({**par, "threads": cores}, Schedule(n=1), plan, steps=4)
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.slow
def test_bad_input_subprocesses(tmp_path):
    """The real command lines, as separate processes (run together: each mostly imports)."""
    conf = broken_model_dir(tmp_path)
    cases = {
        "model": (RUN_MAIN + _args(["model=xyz"], tmp_path / "a"), {}, "model=xyz: unknown"),
        "yaml": (RUN_MAIN + _args(["model=broken", f"hydra.searchpath=[file://{conf}]"],
                                  tmp_path / "b"), {}, "model: missing required key 'builder'"),
        "world": ([sys.executable, "-m", "experiments.run",
                   *_args(["parallel.n=2", "parallel.stride=2"], tmp_path / "c")],
                  {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"},
                  "WORLD_SIZE=4 (torchrun --nproc-per-node × nodes); allowed: "
                  "parallel.replicas × groups × devices = 1 × 1 × 3 = 3 (N=2 S=2 W=1)"),
    }
    procs = {k: (popen(args, **extra), msg) for k, (args, extra, msg) in cases.items()}
    for key, (proc, msg) in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [l for l in err.splitlines() if l.strip()]
        assert proc.returncode == 2, (key, err[-2000:])
        assert lines == [lines[-1]] and lines[-1].startswith("error: ") and msg in lines[-1], \
            (key, err)
    for sub in "abc":
        assert not (tmp_path / sub).exists(), f"{sub}: nothing may be written"


# --------------------------------------------------------------------------- found late


@pytest.fixture
def hydra_run_dir(tmp_path):
    """A Hydra task's state, as ``@hydra.main`` leaves it: its run directory made."""
    from hydra.core.hydra_config import HydraConfig

    out = tmp_path / "run"
    out.mkdir()
    HydraConfig.instance().set_config(compose_cfg(f"hydra.runtime.output_dir={out}",
                                                  hydra_node=True))
    yield out
    HydraConfig.instance().cfg = None


def test_a_task_that_fails_marks_its_run_directory_failed(hydra_run_dir, capsys):
    from experiments.common import FAILED, exit_on_bad_input

    @exit_on_bad_input
    def task(error: BaseException) -> None:
        (hydra_run_dir / "plan.json").write_text("{}")  # what a run writes before it fails
        raise error

    with pytest.raises(RuntimeError, match="boom"):
        task(RuntimeError("boom\nsecond line"))
    text = (hydra_run_dir / FAILED).read_text()
    assert text.startswith("RuntimeError: boom\n") and "Traceback" in text
    with pytest.raises(SystemExit) as exc:  # bad input found late: one line, exit code 2
        task(ConfigError("partition: boundaries: no traced module 'nope'"))
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert (hydra_run_dir / FAILED).read_text().startswith(
        "ConfigError: partition: boundaries: no traced module 'nope'")


@pytest.mark.slow
def test_bad_input_found_after_planning_leaves_a_failed_run_directory(tmp_path):
    """The real command line: a manual boundary the traced model does not have is known only
    after the capture, when Hydra has made the run directory."""
    from experiments.common import FAILED

    out = tmp_path / "run"
    proc = popen([sys.executable, "-m", "experiments.run", "model=sd3", *FAST,
                  "partition.strategy=manual", "partition.boundaries=[nope]", "parallel.n=2",
                  f"hydra.run.dir={out}"])
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: partition: boundaries: no "
                                                         "traced module 'nope'"), err
    assert "no traced module 'nope'" in (out / FAILED).read_text()
    assert not (out / "metrics.json").exists()
