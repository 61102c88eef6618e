"""``--help`` is Hydra's, from the ``asyncdiff`` help template: a paragraph, examples, the
config groups the command uses (not every group under conf/, not the composed config) and
where the configuration is described; ``--version`` is asyncdiff's."""
from __future__ import annotations

import importlib.metadata
import string
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from exp_helpers import RUN_MAIN, popen

from experiments import cli, usage
from experiments.common import CONF_DIR

ZOO = len(list(Path(CONF_DIR, "model", "zoo").glob("*.yaml")))


def help_text(command: str) -> str:
    """What Hydra prints for ``--help`` (hydra.help.template, resolved, then $-substituted)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=command):
        cfg = compose("config", return_hydra_config=True)
        template = cfg.hydra.help.template
    return string.Template(template).substitute(FLAGS_HELP="", HYDRA_CONFIG_GROUPS="",
                                                APP_CONFIG_GROUPS="", CONFIG="")


@pytest.mark.parametrize("command, groups", [
    ("run", ["model", "pipeline", "parallel", "scheduler", "partition", "+experiment",
             "hydra/launcher"]),
    ("plan", ["model", "parallel", "scheduler", "partition"]),
    ("bench", ["model", "parallel", "scheduler", "partition"]),
])
def test_help_is_a_paragraph_examples_and_the_commands_groups(command, groups):
    text = help_text(command)
    lines = text.splitlines()
    assert lines[0].startswith(f"asyncdiff-{command}: ")
    examples = lines[lines.index("Examples:") + 1:]
    assert examples[0].startswith(f"  asyncdiff-{command} ")
    start = next(i for i, line in enumerate(lines) if line.startswith("Config groups"))
    listed = [line.split(":")[0].strip() for line in lines[start + 1:]
              if line.startswith("  ") and not line.startswith("   ")]
    assert listed == groups
    assert f"zoo/NAME ({ZOO} more: conf/model/zoo/)" in text  # not the 70+ names
    assert "train" not in listed and "bria" not in text
    assert f"{Path(CONF_DIR) / 'README.md'}" in text and (Path(CONF_DIR) / "README.md").is_file()
    assert "seed:" not in text and len(lines) < 45  # no dump of the composed config


def test_a_pipeline_runs_generations_and_how_to_skip_the_warmup_are_in_the_help():
    text = " ".join(help_text("run").split())
    assert "four generations" in text and "pipeline.warm_call=false skips" in text


def test_version_is_asyncdiffs(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.answer_version(["model=sd15", "--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"asyncdiff {importlib.metadata.version('asyncdiff')}\n"
    cli.answer_version(["model=sd15"])  # no flag: nothing said, nothing ends
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_the_console_scripts_print_it():
    """The real command lines (each process mostly imports: run together)."""
    plan = [sys.executable, "-c", "import sys; sys.argv[0] = 'asyncdiff-plan'; "
            "from experiments.cli import plan_main; plan_main()"]
    procs = {"run": popen(RUN_MAIN + ["--help"]), "plan": popen(plan + ["--help"]),
             "version": popen(RUN_MAIN + ["--version"])}
    out = {k: p.communicate(timeout=120) for k, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), out
    assert out["run"][0].startswith("asyncdiff-run: Sample with the asynchronous pipeline")
    assert out["plan"][0].startswith("asyncdiff-plan: Compile a model into N stages")
    assert out["version"][0] == f"asyncdiff {importlib.metadata.version('asyncdiff')}\n"
