"""What ``--help`` and ``--version`` say (the text; Hydra prints it).

``--help`` is Hydra's own: the template of the ``hydra/help`` group, ``asyncdiff``
(``conf/hydra/help/asyncdiff.yaml``), chosen in ``conf/config.yaml``. It asks two resolvers
registered here for what differs by command (Hydra's job name: ``run`` for ``asyncdiff-run``
and ``python -m experiments.run``): ``${asyncdiff.help:run}`` is the command's paragraph, its
examples and the config groups it uses with their options (read from Hydra's config loader,
so a new YAML file shows up by itself), ``${asyncdiff.conf_readme:}`` where the configuration
is described. ``--version`` is answered before Hydra starts (:func:`version`).
"""
from __future__ import annotations

import importlib.metadata
import textwrap
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from experiments.common import CONF_DIR

WIDTH = 92


@dataclass(frozen=True)
class Command:
    about: str
    examples: tuple[str, ...]
    groups: tuple[str, ...]


_SAMPLED = ("model", "parallel", "scheduler", "partition")
COMMANDS: dict[str, Command] = {
    "run": Command(
        "Sample with the asynchronous pipeline (AsyncDiff) and with the sequential sampler "
        "from the same seed, and compare them: latency, speedup, PSNR/SSIM, bytes sent, the "
        "per-device timeline. The model is a YAML of conf/model/ (random weights, or a "
        "trained reference model), or a diffusers pipeline from a local checkpoint "
        "(pipeline=NAME pipeline.path=DIR: prompts to images). The workers are spawned here, "
        "one per device, or started by torchrun. A pipeline run makes four generations: a "
        "warm-up call and the timed call, for the plain pipeline and for the asynchronous "
        "one (pipeline.warm_call=false skips both warm-up calls). Each run writes its "
        "directory (outputs/<date>/<time>/); -m runs a sweep and ends with one results "
        "table and its plots.",
        ("asyncdiff-run model=sd15 parallel.n=2 parallel.stride=2",
         "asyncdiff-run model=digits batch=4 parallel.n=2 parallel.cooldown=3",
         "asyncdiff-run scheduler=dpmsolver++ scheduler.guidance=7.5",
         "asyncdiff-run pipeline=sd15 pipeline.path=DIR parallel.n=3 parallel.warmup=3",
         "asyncdiff-demo-checkpoint sd15 DIR     # a tiny checkpoint to try the line above on",
         "asyncdiff-run -m +experiment=stride_warmup",
         "asyncdiff-run -m parallel.n=2,3 parallel.stride=1,2",
         "torchrun --nproc-per-node=3 -m experiments.run parallel.n=2 parallel.stride=2"),
        ("model", "pipeline", *_SAMPLED[1:], "+experiment", "hydra/launcher")),
    "plan": Command(
        "Compile a model into N stages and print the plan: each stage's modules, FLOPs, "
        "parameters, what crosses each cut and the predicted speedup; writes plan.json "
        "(and plan.txt) into the run directory. Nothing is sampled.",
        ("asyncdiff-plan model=sd15 parallel.n=4",
         "asyncdiff-plan model=sdxl partition=shell_core parallel.n=3",
         "asyncdiff-plan model=sd21 partition=paper_sd21_n2",
         "asyncdiff-plan model=sd15 model.variant=full partition.cost_model=flops",
         "asyncdiff-plan parallel.n=3 parallel.stride=2 print_comm=true   # + what each rank "
         "sends"),
        _SAMPLED),
    "bench": Command(
        "Time the sequential sampler on 1 and on P threads against the asynchronous "
        "pipeline of P = N-1+S one-thread workers, bench.repeats times each; writes "
        "bench.csv, bench.json (medians, speedups, the plan's prediction) and metrics.json "
        "into the run directory. Timings need an otherwise idle machine.",
        ("asyncdiff-bench model=sd15 parallel.n=2 bench.repeats=5",
         "asyncdiff-bench -m parallel.n=2,3,4"),
        _SAMPLED),
    "demo": Command(
        "Plan the trained digits model, sample ten digits sequentially and asynchronously "
        "from the same seed, and print the latencies, how far the images moved and how "
        "many the model's classifier recognises.",
        ("python -m experiments.demo", "python -m experiments.demo parallel.n=3",
         "python -m experiments.demo model=patches"),
        _SAMPLED),
    "study": Command(
        "The quality study on a trained reference model: every point of an experiment "
        "sampled with the emulator and compared with the sequential sampler (PSNR, FD, "
        "classifier accuracy, with intervals); results.json, table.md and plots under "
        "study.out.",
        ("python -m experiments.study +experiment=quality_table1",
         "python -m experiments.study +experiment=quality_warmup model=patches"),
        ("model", "+experiment", *_SAMPLED[1:])),
}


def options(group: str) -> list[str]:
    """The options of a config group, as Hydra's config loader finds them (YAML files and
    the ConfigStore's entries), with the config directory's subgroups (``model/zoo``)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    found = list(loader.get_group_options(group))
    for sub in sorted(p.name for p in Path(CONF_DIR, group).glob("*/") if p.is_dir()):
        count = len(loader.get_group_options(f"{group}/{sub}"))
        found.append(f"{sub}/NAME ({count} more: conf/{group}/{sub}/)")
    return found


def text(command: str) -> str:
    """The command's paragraph, examples and config groups (``${asyncdiff.help:NAME}``)."""
    c = COMMANDS.get(command)
    if c is None:
        return f"asyncdiff-{command}"
    lines = [*textwrap.wrap(f"asyncdiff-{command}: {c.about}", WIDTH), "", "Examples:"]
    lines += [f"  {e}" for e in c.examples]
    lines += ["", "Config groups (GROUP=OPTION; each key of a group: GROUP.KEY=VALUE):"]
    for g in c.groups:  # "+experiment": a group the root config does not choose
        lines += textwrap.wrap(", ".join(options(g.lstrip("+"))), WIDTH,
                               initial_indent=f"  {g}: ", subsequent_indent=" " * (len(g) + 4))
    return "\n".join(lines)


def conf_readme() -> str:
    """Where the configuration is described: ``conf/README.md`` (installed: the package's)."""
    return str(Path(CONF_DIR) / "README.md")


def version() -> str:
    """``asyncdiff <version>``, from the installed package's metadata."""
    try:
        return f"asyncdiff {importlib.metadata.version('asyncdiff')}"
    except importlib.metadata.PackageNotFoundError:
        return "asyncdiff: no version (not installed; pip install . to get one)"


def register() -> None:
    """The resolvers the help template asks (idempotent)."""
    OmegaConf.register_new_resolver("asyncdiff.help", text, replace=True)
    OmegaConf.register_new_resolver("asyncdiff.conf_readme", conf_readme, replace=True)
