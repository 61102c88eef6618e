"""``asyncdiff-demo-checkpoint NAME DIR``: a tiny pipeline of a ``conf/pipeline/`` class with
random weights, saved where a user's checkpoint would be, and the command that tries it."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from experiments import checkpoints
from experiments.cli import check_command_line
from experiments.common import CONF_DIR


def test_every_pipeline_config_has_a_tiny_checkpoint():
    assert set(checkpoints.CHECKPOINTS) == {p.stem for p in Path(CONF_DIR, "pipeline")
                                            .glob("*.yaml")}


def test_the_console_script_writes_a_checkpoint_its_command_runs(tmp_path, capsys):
    where = tmp_path / "sd15-tiny"
    checkpoints.main(["sd15", str(where)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote a tiny StableDiffusionPipeline (random weights) to {where}; try it:"
    command = shlex.split(out[1])
    assert command[0] == "asyncdiff-run" and f"pipeline.path={where}" in command
    # the command's whole configuration passes every check, the checkpoint's own included
    assert check_command_line(command[1:] + ["wandb.mode=disabled"]) == 1
    assert (where / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["sd16", "x"], "error: NAME='sd16': unknown; allowed: sd15, sd21, sdxl, sd3, pixart, "
                    "flux, svd, animatediff\n"),
    (["sd15"], "error: the following arguments are required: DIR"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        checkpoints.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_a_directory_with_files_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("a user's file")
    with pytest.raises(SystemExit) as exc:
        checkpoints.main(["sd15", str(tmp_path)])
    assert exc.value.code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("name", checkpoints.CHECKPOINTS)
def test_the_step_limit_is_found_for_every_checkpoints_scheduler(name):
    """The check of scheduler.steps (schedulers.factory.steps_problem) runs on any diffusers
    scheduler a checkpoint may bring: flow matching, continuous timesteps, v-prediction."""
    from schedulers.factory import steps_problem

    s = checkpoints.scheduler(name)
    assert steps_problem(s, 10) is None
    assert "training timesteps" in steps_problem(s, s.config.num_train_timesteps + 1)
