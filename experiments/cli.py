"""Check the whole command line before Hydra starts: bad input is one line, exit code 2,
and nothing is written (Hydra makes the output directory before the task runs).

``checked(hydra_main)`` is what the console scripts call. It composes every job the
command asks for (a ``-m`` sweep: each point of the cartesian product of the command
line's and ``hydra.sweeper.params``' sweeps, combined as Hydra's basic sweeper does) through
Hydra's compose API and validates each resolved config (``experiments/validate.py``).
Hydra's own composition errors (``model=xyz``, a misspelt key) become one line too.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Mapping

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.common import CONF_DIR, ConfigError
from experiments.validate import validate_config

# Our hydra/launcher/basic.yaml (and submitit_slurm.yaml, with the plugin installed) has the
# name of a launcher schema in Hydra's ConfigStore: Hydra validates it against that schema,
# as intended, and warns that this matching is deprecated. Say it once here, not every run.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against "
                        "ConfigStore schema")

# flags that print something instead of running a job
_NO_RUN = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun")


def one_line(err: BaseException) -> str:
    """A composition error as one line; a missing config option lists the allowed ones."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name}: unknown; allowed: {', '.join(err.options)}"
    while not str(err).strip() and err.__cause__ is not None:  # Hydra wraps the real error
        err = err.__cause__
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text.split(" Config search path:")[0] or type(err).__name__


def job_configs(overrides: list[str], multirun: bool, config_name: str = "config",
                config_dir: str = CONF_DIR) -> list[DictConfig]:
    """Compose the config of every job the command line describes (with the hydra node)."""
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        if not multirun:
            return [compose(config_name, overrides=overrides, return_hydra_config=True)]
        parser = OverridesParser.create()
        parsed = parser.parse_overrides(overrides)
        # the sweeper's own params are in the config: compose one point to read them
        first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
                 if o.is_sweep_override() else o.input_line for o in parsed]
        head = compose(config_name, overrides=first, return_hydra_config=True)
        sweeper = head.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return [head]  # another sweeper chooses its points itself
        points = sweep_points(overrides, sweeper.get("params"))
        return [compose(config_name, overrides=p, return_hydra_config=True) for p in points]


def sweep_points(overrides: list[str], params: Mapping | None = None) -> list[list[str]]:
    """The overrides of each job of a basic-sweeper sweep: ``hydra.sweeper.params`` first,
    the command line after (and winning), cartesian product of every swept key."""
    given = [f"{k}={v}" for k, v in (params or {}).items()]
    parsed = OverridesParser.create().parse_overrides(given + list(overrides))
    return BasicSweeper.split_arguments(parsed, None)[0]


def _check_launcher(cfg: DictConfig) -> None:
    target = str(cfg.hydra.launcher.get("_target_", ""))
    module = target.rpartition(".")[0]
    try:
        found = bool(module) and importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if module and not found:
        choice = cfg.hydra.runtime.choices.get("hydra/launcher", target)
        hint = " (pip install hydra-submitit-launcher)" if "submitit" in module else ""
        raise ConfigError(f"hydra/launcher={choice}: needs {module}, which is not installed"
                          f"{hint}; allowed without it: basic")


def check_command_line(argv: list[str], entry: str = "run",
                       env: Mapping[str, str] | None = None) -> int:
    """Validate every job of the command line; return the number of jobs (0: nothing runs)."""
    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in _NO_RUN):
        return 0
    overrides = list(args.overrides)
    if args.config_dir:
        overrides.append(f"hydra.searchpath=[file://{os.path.abspath(args.config_dir)}]")
    default = entry if entry in ("demo", "study") else "config"  # conf/demo.yaml, study.yaml
    configs = job_configs(overrides, args.multirun, args.config_name or default)
    for cfg in configs:
        if args.multirun:
            _check_launcher(cfg)
        validate_config(resolved_job(cfg), env, entry)
    return len(configs)


def resolved_job(cfg: DictConfig) -> dict:
    """A composed config without its ``hydra`` node, resolved to plain data (what the job's
    ``plain(cfg)`` will be; ``${hydra:…}`` and ``${now:…}`` live only in the hydra node)."""
    job = OmegaConf.to_container(cfg, resolve=False)
    job.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(job), resolve=True)


def check_or_exit(argv: list[str], entry: str) -> None:
    """:func:`check_command_line`; on bad input print one line and exit with code 2."""
    try:
        check_command_line(argv, entry)
    except (ConfigError, HydraException, OmegaConfBaseException, ValueError) as err:
        msg = str(err) if isinstance(err, ConfigError) else one_line(err)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def checked(hydra_main: Callable[[], None], entry: str = "run") -> Callable[[], None]:
    """Wrap a ``@hydra.main`` function: check the command line first, then run it
    (``python -m experiments.<entry>``)."""
    @functools.wraps(hydra_main)
    def main() -> None:
        check_or_exit(sys.argv[1:], entry)
        hydra_main()
    return main


def _console(module: str, entry: str) -> None:
    check_or_exit(sys.argv[1:], entry)
    # imported after the check: the runtime pulls in diffusers (seconds), a typo should not wait
    importlib.import_module(module).hydra_main()


def plan_main() -> None:
    """Console script ``asyncdiff-plan``."""
    _console("experiments.plan", "plan")


def run_main() -> None:
    """Console script ``asyncdiff-run``."""
    _console("experiments.run", "run")


def bench_main() -> None:
    """Console script ``asyncdiff-bench``."""
    _console("experiments.bench", "bench")
