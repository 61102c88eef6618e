"""Every job a command line describes, composed and checked before Hydra starts: bad input is
one line, exit code 2, and nothing written (Hydra makes the output directory before the task
runs, and reports its own composition errors on several lines with exit code 1).

Composition goes through Hydra's public compose API, so the schema (``experiments/schema.py``)
checks types, allowed values and unknown keys; ``experiments/checks.py`` checks the rest. A
``-m`` sweep is expanded as Hydra's basic sweeper does (``hydra.sweeper.params`` first, the
command line after and winning, the cartesian product of every swept key), each point
composed and checked. Only configuration errors (:class:`ConfigError`) exit with 2.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException, ValidationError

from experiments import schema, usage
from experiments.checks import check_config
from experiments.common import CONF_DIR, ConfigError

usage.register()  # the resolvers of --help (conf/hydra/help/asyncdiff.yaml)

# flags that print something instead of running a job (Hydra's own command line)
_NO_RUN = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun")


def argument_parser() -> argparse.ArgumentParser:
    """Hydra's command line (hydra.main's flags), as far as a check needs it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--help", "-h", action="store_true")
    p.add_argument("--hydra-help", action="store_true")
    p.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    p.add_argument("--resolve", action="store_true")
    p.add_argument("--package", "-p")
    p.add_argument("--run", "-r", action="store_true")
    p.add_argument("--multirun", "-m", action="store_true")
    p.add_argument("--shell-completion", "-sc", action="store_true")
    p.add_argument("--config-path", "-cp")
    p.add_argument("--config-name", "-cn")
    p.add_argument("--config-dir", "-cd")
    p.add_argument("--experimental-rerun")
    p.add_argument("--info", "-i", const="all", nargs="?")
    return p


def one_line(err: BaseException) -> str:
    """A composition error as one line naming the key and what is allowed."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name}: unknown; allowed: {', '.join(err.options)}"
    cause = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, (ValidationError, ConfigAttributeError)) and cause.full_key:
        return _schema_error(cause)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    while not str(err).strip() and err.__cause__ is not None:  # Hydra wraps the real error
        err = err.__cause__
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text.split(" Config search path:")[0] or type(err).__name__


def _schema_error(err: OmegaConfBaseException) -> str:
    first = str(err.msg).splitlines()[0]
    key = err.full_key
    if first.startswith("Invalid value"):  # an enum: "Invalid value 'x', expected one of [...]"
        value = first.split("'")[1]
        allowed = first.split("[", 1)[1].rsplit("]", 1)[0]
        return f"{key}={value!r}; allowed: {allowed}"
    if first.startswith("Key ") and " not in " in first:
        fields = [f for f in getattr(err.object_type, "__dataclass_fields__", {})]
        allowed = ", ".join(fields) or "a key it has, or a new one as +key=value"
        return f"{key}: unknown key; allowed: {allowed}"
    kinds = {"Integer": "an integer", "Float": "a number", "bool": "true, false"}
    value = first.split("'")[1] if first.startswith("Value '") else "?"
    kind = next((v for k, v in kinds.items() if k in first), first)
    return f"{key}={value!r}; allowed: {kind}"


def sweep_points(overrides: list[str], params: Mapping | None = None) -> list[list[str]]:
    """The overrides of each job of a basic-sweeper sweep: ``hydra.sweeper.params`` first,
    the command line after (and winning), cartesian product of every swept key."""
    given = [f"{k}={v}" for k, v in (params or {}).items()]
    by_key: dict[str, object] = {}
    for o in OverridesParser.create().parse_overrides(given + list(overrides)):
        by_key[o.get_key_element()] = o
    choices = [[f"{k}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for k, o in by_key.items()]
    return [list(point) for point in itertools.product(*choices)]


def job_configs(overrides: list[str], multirun: bool, config_name: str = "config",
                config_dir: str = CONF_DIR) -> list[DictConfig]:
    """Compose the config of every job the command line describes (with the hydra node)."""
    schema.register()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        if not multirun:
            return [_compose(config_name, overrides, config_dir)]
        parsed = OverridesParser.create().parse_overrides(overrides)
        # the sweeper's own params are in the config: compose one point to read them
        first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
                 if o.is_sweep_override() else o.input_line for o in parsed]
        head = _compose(config_name, first, config_dir)
        sweeper = head.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return [head]  # another sweeper chooses its points itself
        return [_compose(config_name, p, config_dir)
                for p in sweep_points(overrides, sweeper.get("params"))]


def _compose(config_name: str, overrides: list[str], config_dir: str) -> DictConfig:
    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (AssertionError, HydraException, OmegaConfBaseException):
        check_chosen_groups(config_name, overrides, config_dir)  # the cause, as one line
        raise


def check_chosen_groups(config_name: str, overrides: list[str], config_dir: str) -> None:
    """A key under a config group left at null (``pipeline.path=…`` without ``pipeline=NAME``)
    is one ConfigError naming the key and the group's options (Hydra's merge fails on it with
    an assertion: ``Unexpected type for root: NoneType``). Inside Hydra's config dir."""
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml"))
              for p in Path(config_dir).iterdir() if p.is_dir() and p.name != "hydra"}
    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = [o for o in parsed if "." in o.key_or_group and o.key_or_group.split(".")[0] in groups]
    if not keys:
        return
    base = compose(config_name, overrides=[o.input_line for o in parsed if o not in keys])
    for o in keys:
        group = o.key_or_group.split(".")[0]
        if group in base and base[group] is None:
            raise ConfigError(f"{o.input_line}: no {group} chosen; allowed: {group}=NAME before "
                              f"it (NAME: {', '.join(groups[group])})")


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


def resolved_job(cfg: DictConfig) -> dict:
    """A composed config without its ``hydra`` node, resolved to plain data (what the job's
    ``plain(cfg)`` will be; ``${hydra:…}`` and ``${now:…}`` live only in the hydra node)."""
    job = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    job.pop("hydra", None)
    return _drop_missing(OmegaConf.to_container(OmegaConf.create(job), resolve=True))


def _drop_missing(d):
    """Mandatory values left unset (``???``) are absent keys to the checks."""
    if isinstance(d, dict):
        return {k: _drop_missing(v) for k, v in d.items() if v != "???"}
    if isinstance(d, list):
        return [_drop_missing(v) for v in d]
    return d


def check_command_line(argv: list[str], entry: str = "run",
                       env: Mapping[str, str] | None = None) -> int:
    """Compose and check every job of the command line; return how many (0: nothing runs)."""
    args, _ = argument_parser().parse_known_args(argv)
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
        check_config(resolved_job(cfg), env, entry)
    return len(configs)


def check_or_exit(argv: list[str], entry: str) -> None:
    """:func:`check_command_line`; on bad input print one line and exit with code 2."""
    try:
        check_command_line(argv, entry)
    except ConfigError as err:
        _exit(str(err))
    except (HydraException, OmegaConfBaseException) as err:  # composition: bad input too
        _exit(one_line(err))


def _exit(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def answer_version(argv: list[str]) -> None:
    """``--version``: asyncdiff's (Hydra's own flag would print Hydra's), and exit."""
    if "--version" in argv:
        print(usage.version())
        sys.exit(0)


def checked(hydra_main: Callable[[], None], entry: str = "run") -> Callable[[], None]:
    """Wrap a ``@hydra.main`` function: check the command line first, then run it
    (``python -m experiments.<entry>``)."""
    @functools.wraps(hydra_main)
    def main() -> None:
        answer_version(sys.argv[1:])
        check_or_exit(sys.argv[1:], entry)
        hydra_main()
    return main


def _console(module: str, entry: str) -> None:
    answer_version(sys.argv[1:])
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

