"""The configuration's schema: typed dataclasses registered in Hydra's ConfigStore.

Hydra validates every composed config against these when it merges the YAML files and the
command line (types, the allowed values of every enum, unknown keys), and they hold the
defaults and what each key means. What a type cannot say — ranges, and one key against
another (W <= T, the world size against the devices a split needs) — is checked in code
(``experiments/checks.py``). The YAML files under ``conf/`` select and override.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from asyncdiff.timeline import STRIDE_NOISE
from partition import CHOICES, splits


class Variant(Enum):
    tiny = "tiny"              # random weights, built from the config (tests, a CPU)
    full = "full"              # the released architecture, random weights
    pretrained = "pretrained"  # the released weights, from the local cache (never downloaded)


def _choices(name: str, values) -> type[Enum]:
    """An enum of the library's own list (Hydra checks a key against it): one list each."""
    return Enum(name, {v: v for v in values})


# partition/strategies/registry.py: balanced (min–max balanced cuts at module boundaries),
# equal_blocks (the same number of blocks per stage, a baseline), manual (boundaries or stages
# written by hand: the paper's splits), shell_core (last stage = a prefix + a suffix: the
# paper's SDXL split)
Strategy = _choices("Strategy", CHOICES["strategy"])
# partition/cost.py: time (the eager model's module times; noisy: measure once, share the
# plan), flops (torch's FLOP counter on fake tensors: deterministic), fvcore (its counts)
CostModel = _choices("CostModel", CHOICES["cost_model"])
# partition/backend.py: auto (torch.export; the module backend where it cannot capture),
# graph (torch.export only), module (the network's own blocks, run eagerly)
CaptureBackend = _choices("CaptureBackend", CHOICES["backend"])
# asyncdiff/timeline.py, [Note: staleness]: fresh (each step of a batch its own ε, N−1+S
# devices), reuse (the public code at S = 2: one ε for the batch, N devices), official (reuse,
# batches at odd k >= W as the public code aligns them)
StrideNoise = _choices("StrideNoise", STRIDE_NOISE)


class Device(Enum):
    cpu = "cpu"
    cuda = "cuda"


class CommBackend(Enum):
    auto = "auto"  # nccl when every local rank has its own GPU, else gloo
    gloo = "gloo"
    nccl = "nccl"


class WandbMode(Enum):
    offline = "offline"    # no account or network; `wandb sync <run dir>/wandb/offline-run-*`
    online = "online"      # needs `wandb login`
    disabled = "disabled"  # wandb is not imported


@dataclass
class ModelConf:
    """A denoiser described by config: one ``conf/model/<name>.yaml`` (docs/partitioning.md)."""

    name: str = MISSING
    description: str = ""
    variant: Variant = Variant.tiny
    builder: Dict[str, Any] = MISSING             # _target_: a callable returning the module
    contract: Optional[Dict[str, Any]] = None     # how it is called (partition/contract.py)
    tiny: Optional[Dict[str, Any]] = None         # {config, inputs} per variant
    full: Optional[Dict[str, Any]] = None
    pretrained: Optional[Dict[str, Any]] = None   # {id, subfolder, ...}: the local HF cache
    reference: Optional[Dict[str, Any]] = None    # trained reference models: data, tokens, ...
    schedule: Optional[Dict[str, Any]] = None     # trained reference models: training betas
    scheduler_options: Optional[Dict[str, Any]] = None  # per scheduler name: its arguments


@dataclass
class PartitionConf:
    """How the denoiser is cut into stages (partition/, docs/partitioning.md)."""

    strategy: Strategy = Strategy.balanced
    cost_model: CostModel = CostModel.time
    depth: Optional[int] = 4             # module-path depth of candidate cuts (null: any node)
    slack: float = 0.01                  # comm tie-break: splits within 1+slack of the best
    memory_cap_mb: Optional[float] = None  # most parameter MiB one stage may hold
    repeats: int = 1                     # cost_model=time: each timing taken this many
    #                                      times, the median kept (the eager model's modules,
    #                                      then each stage)
    target: float = 1.02                 # good enough: slowest stage over the mean
    deepen: int = 4                      # balanced: module levels below depth a cut may go,
    #                                      locally, where depth cannot reach the target
    refine: int = 3                      # cost_model=time: re-cuts on the stages' measured
    #                                      times at most (0: the first split stands)
    threads: Optional[int] = 1           # intra-op threads while timing and verifying
    verify: bool = True                  # check the stages against the eager model
    backend: CaptureBackend = CaptureBackend.auto
    device: Device = Device.cpu          # where cost_model=time times the model
    boundaries: Optional[List[str]] = None        # manual: stage j starts at boundaries[j-1]
    stages: Optional[List[List[str]]] = None      # manual: the modules each stage owns
    shell_depth: Optional[int] = None    # shell_core: depth of the prefix/suffix boundaries
    shell_slack: Optional[float] = None  # shell_core: fewest bytes within 1+shell_slack


@dataclass
class ParallelConf:
    """How the pipeline runs (docs/design.md §2). Devices per pipeline: N−1+S (fresh) or N."""

    n: int = 2                 # N: stages
    stride: int = 1            # S: steps one parallel round finishes
    warmup: int = 1            # W: sequential warm-up steps
    cooldown: int = 0          # C: the last C steps sequential too (W + C <= T)
    sync: List[int] = field(default_factory=list)  # steps in between run sequential too
    time_shift: bool = False   # feed the network the previous step's timestep after warm-up
    stride_noise: StrideNoise = StrideNoise.fresh
    backend: CommBackend = CommBackend.auto
    threads: int = 1           # intra-op threads per worker
    replicas: int = 1          # R independent pipelines (world size R x devices)
    cfg_parallel: bool = False  # CFG-parallel: the guidance halves on two groups of devices
    #                             (world size x 2; N = 1: the whole model per half; N > 1: the
    #                             hybrid, one pipeline per half; asyncdiff/guidance.py)
    cache_interval: int = 0    # step cache K (one device, the study's emulator; needs the
    #                             shell_core split): 0 = off (asyncdiff/timeline.py)
    # how long a worker may wait for a peer / the whole run may take before it is stopped as
    # failed; null: derived from the plan's step time (asyncdiff/distributed/limits.py)
    step_timeout_s: Optional[float] = None
    run_timeout_s: Optional[float] = None
    startup_timeout_s: Optional[float] = None


@dataclass
class SchedulerConf:
    """The sampler (schedulers/): one ``conf/scheduler/<name>.yaml`` per name."""

    name: str = "ddim"                 # ddim | dpmsolver++ | euler (schedulers.SCHEDULERS)
    steps: int = 50                    # T
    guidance: Optional[float] = None   # classifier-free guidance scale (null: none)


@dataclass
class WandbConf:
    mode: WandbMode = WandbMode.offline
    project: str = "asyncdiff"
    entity: Optional[str] = None
    group: Optional[str] = None        # null: the sweep directory's name in a multirun
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None          # null: the run's output directory


@dataclass
class MetricsConf:
    # LPIPS, CLIP score and FID on Inception need pretrained networks; nothing is ever
    # downloaded: they are computed where their weights are here, else recorded as skipped
    weights_dir: str = "~/.cache/asyncdiff/weights"


@dataclass
class BenchConf:
    repeats: int = 3       # timed runs of each of: sequential on 1 thread, on P threads, pipeline
    warmup_runs: int = 1   # untimed sequential runs first


@dataclass
class StudyConf:
    """The quality study (``python -m experiments.study``; docs/RESULTS.md)."""

    name: Optional[str] = None   # set by the experiment: the output folder's name
    samples: int = 1000          # images per point, a multiple of chunk
    chunk: int = 250             # images per emulator batch
    fd_samples: int = 700        # Fréchet distance on this many (<= samples)
    bootstrap: int = 2000        # resamples for the intervals of the per-sample measures
    fd_bootstrap: int = 200      # resamples for the FD interval
    points: List[List[str]] = field(default_factory=list)  # extra points, lists of overrides
    similarity: Optional[int] = None  # an N: record each stage's input between steps
    threads: int = 1
    device: Device = Device.cpu
    out: str = "docs/results"    # results in <out>/<model>/<name>/
    cache: str = "outputs/study"  # samples per point and chunk, reused by reruns
    frontier: List[int] = field(default_factory=list)  # device counts: the Pareto front of
    #                                  the points that fit each (experiments/frontier.py)


class PipelineKind(Enum):
    text = "text"    # prompts (and a negative prompt)
    image = "image"  # a conditioning image (SVD)


class Load(Enum):
    lazy = "lazy"    # each rank builds the denoiser on the meta device, reads its stage only
    whole = "whole"  # each rank loads it whole, verifies the split, drops the rest


class Dtype(Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class PipelineConf:
    """A diffusers pipeline from a local checkpoint: one ``conf/pipeline/<name>.yaml``
    (``experiments/generate.py``). T and the guidance scale are ``scheduler.steps`` and
    ``scheduler.guidance``; the sampler is the checkpoint's own scheduler."""

    name: str = MISSING
    cls: str = MISSING                 # the pipeline class model_index.json must name
    path: str = MISSING                # local directory (from_pretrained, local_files_only)
    kind: PipelineKind = PipelineKind.text
    prompts: List[str] = field(default_factory=list)
    prompt_file: Optional[str] = None  # one prompt per line, after ``prompts``
    negative_prompt: Optional[str] = None
    seeds: Optional[List[int]] = None  # one call per prompt and seed (null: [seed])
    height: Optional[int] = None       # null: the pipeline's default
    width: Optional[int] = None
    frames: Optional[int] = None       # video pipelines: num_frames
    image: Optional[str] = None        # kind=image: the conditioning image
    dtype: Dtype = Dtype.float32
    load: Load = Load.lazy             # how each rank of the asynchronous run loads the denoiser
    warm_call: bool = True             # one untimed call first (the first parallel call plans)
    call: Dict[str, Any] = field(default_factory=dict)  # more keyword arguments of the call


@dataclass
class Config:
    """The root of every entry point (asyncdiff-plan, -run, -bench, the demo, the study)."""

    model: ModelConf = field(default_factory=ModelConf)
    parallel: ParallelConf = field(default_factory=ParallelConf)
    scheduler: SchedulerConf = field(default_factory=SchedulerConf)
    partition: PartitionConf = field(default_factory=PartitionConf)
    seed: int = 0
    batch: Optional[int] = None        # images per pipeline (null: the model's example batch)
    labels: Optional[List[int]] = None  # trained reference models: class labels, cycled
    out: str = "plan.json"             # asyncdiff-plan: written into the run's directory
    print_report: bool = True          # print the plan table
    print_comm: bool = False           # asyncdiff-plan: print (and write comm.txt) what each
    #                                    rank sends and receives, round by round (the lowering)
    progress: bool = True              # tqdm bars (on a terminal)
    save_images: bool = True
    wandb: WandbConf = field(default_factory=WandbConf)
    metrics: MetricsConf = field(default_factory=MetricsConf)
    bench: BenchConf = field(default_factory=BenchConf)
    study: Optional[StudyConf] = None  # the quality study only
    pipeline: Optional[PipelineConf] = None  # asyncdiff-run pipeline=NAME: a real pipeline


def register() -> None:
    """Store the schema as ``base_config`` (``conf/config.yaml`` starts from it), and each of
    the paper's splits as an option of the ``partition`` group (``partition=paper_sd15_n3``:
    the compiler's data, ``partition/splits.py``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name in splits.names():
        s = splits.named(name)
        cs.store(group="partition", name=name, package="_global_", node={
            "parallel": {"n": s.n},
            "partition": {"strategy": s.strategy, "cost_model": s.cost_model,
                          "depth": s.depth, "slack": s.slack, "memory_cap_mb": None,
                          "repeats": 0, "threads": 1, "verify": True, "backend": "auto",
                          "target": 1.02, "deepen": 0, "refine": 0,
                          **s.options}})


register()
