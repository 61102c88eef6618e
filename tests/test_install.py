"""The package installs as a wheel (not editable) and works from any directory: the console
scripts find ``conf/`` and the reference weights as package data (importlib.resources), not as
paths relative to a checkout.

The wheel goes into a fresh virtual environment that sees this environment's dependencies
(torch, diffusers, …: a ``.pth`` line, not reinstalled) but not its editable install of this
project; every command runs from an empty temporary directory.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy of the checkout's files: no stale build/ of earlier builds
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\n")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheels)], check=True,
                   capture_output=True, text=True)
    (wheel,) = wheels.glob("asyncdiff-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True,
                             text=True).stdout.strip()
    # this environment's packages, as a plain path: its .pth files (the editable finder of
    # this project) are not processed
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "_asyncdiff_test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True)
    return venv


def run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_ships_conf_and_weights(installed, tmp_path):
    py = str(installed / "bin" / "python")
    out = run(installed, [py, "-c", (
        "import experiments, partition, asyncdiff\n"
        "from experiments.common import conf_dir\n"
        "from experiments import zoo\n"
        "from experiments.reference.model import resolve\n"
        "print(experiments.__file__); print(conf_dir()); print(len(zoo.model_names()))\n"
        "print(resolve('experiments/reference/weights/digits/unet.safetensors').is_file())\n")],
        tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    module, conf, models, weights = out.stdout.split("\n")[:4]
    assert str(installed) in module and str(installed) in conf  # not the checkout
    assert not module.startswith(str(ROOT)) and int(models) >= 9 and weights == "True"


def test_plan_and_run_from_another_directory(installed, tmp_path):
    plan = run(installed, [str(installed / "bin" / "asyncdiff-plan"), "model=sd15",
                           "parallel.n=2", "partition.cost_model=flops", "partition.repeats=0",
                           f"hydra.run.dir={tmp_path / 'plan'}"], tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert (tmp_path / "plan" / "plan.json").is_file()
    assert "verified: exact" in plan.stdout
    runs = run(installed, [str(installed / "bin" / "asyncdiff-run"), "model=digits", "batch=2",
                           "scheduler.steps=3", "partition.cost_model=flops",
                           "partition.repeats=0", "save_images=false", "wandb.mode=disabled",
                           f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert runs.returncode == 0, runs.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    bad = run(installed, [str(installed / "bin" / "asyncdiff-run"), "parallel.n=0"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: parallel.n=0")
    assert not (tmp_path / "outputs").exists()
