"""A diffusers pipeline from a local checkpoint, and the images of one request.

What ``asyncdiff-run pipeline=…`` runs twice from the same seeds, once plain (the sequential
baseline) and once under ``asyncdiff.parallelize`` (every rank of the asynchronous pipeline
runs this same code, SPMD): load the checkpoint, call the pipeline once per *item* (a prompt
and a seed; for an image-conditioned pipeline such as SVD, the conditioning image and a
seed), decode through the pipeline's own VAE. Only the library's public API is used:
``DiffusionPipeline.from_pretrained(path, local_files_only=True)`` and the pipeline's
``__call__`` with ``output_type="pt"``; nothing is downloaded.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.common import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Request:
    """One run's pipeline, inputs and sampling settings (plain data; picklable)."""

    cls: str
    path: str
    kind: str                      # "text": prompts; "image": a conditioning image
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float | None = None  # None: the pipeline's own default
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    image: str | None = None
    dtype: str = "float32"
    load: str = "lazy"             # the ranks' load: "lazy" (asyncdiff.load_pipeline), "whole"
    call: Mapping[str, Any] = field(default_factory=dict)

    @property
    def items(self) -> list[tuple[str | None, int]]:
        """(prompt, seed) of every pipeline call, prompt-major."""
        prompts = self.prompts if self.kind == "text" else (None,)
        return [(p, s) for p in prompts for s in self.seeds]


def prompts_of(pipe_cfg: Mapping) -> tuple[str, ...]:
    """The config's prompts, then the prompt file's non-empty lines."""
    out = list(pipe_cfg.get("prompts") or [])
    if pipe_cfg.get("prompt_file"):
        path = Path(pipe_cfg["prompt_file"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"pipeline.prompt_file={str(path)!r}: no such file; allowed: a "
                              "text file with one prompt per line, or null")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return tuple(out)


def request(cfg: Mapping) -> Request:
    """The request of a plain resolved config (``pipeline``, ``scheduler``, ``seed``)."""
    p, sch = cfg["pipeline"], cfg["scheduler"]
    seeds = tuple(p.get("seeds") or [cfg["seed"]])
    return Request(cls=p["cls"], path=str(Path(p["path"]).expanduser()), kind=p["kind"],
                   prompts=prompts_of(p), seeds=seeds, steps=int(sch["steps"]),
                   guidance=sch.get("guidance"), negative_prompt=p.get("negative_prompt"),
                   height=p.get("height"), width=p.get("width"), frames=p.get("frames"),
                   image=p.get("image"), dtype=p.get("dtype", "float32"),
                   load=p.get("load", "lazy"), call=dict(p.get("call") or {}))


def checkpoint_class(path: str | Path) -> str:
    """The pipeline class a saved checkpoint names (``model_index.json``'s ``_class_name``)."""
    index = Path(path).expanduser() / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"pipeline.path={str(path)!r}: no diffusers checkpoint there (no "
                          "model_index.json); allowed: a local directory written by "
                          "save_pretrained or a downloaded snapshot")
    return json.loads(index.read_text())["_class_name"]


def checkpoint_scheduler(path: str | Path):
    """The scheduler a saved checkpoint samples with (its ``scheduler/`` folder, the class
    ``model_index.json`` names), or None where it has none."""
    root = Path(path).expanduser()
    entry = json.loads((root / "model_index.json").read_text()).get("scheduler")
    if not entry or entry[1] is None or not (root / "scheduler").is_dir():
        return None
    import diffusers
    return getattr(diffusers, entry[1]).from_pretrained(root, subfolder="scheduler")


def check_request(req: Request) -> None:
    """Bad input as one :class:`ConfigError` (before any output is written)."""
    found = checkpoint_class(req.path)
    if found != req.cls:
        raise ConfigError(f"pipeline.cls={req.cls!r} does not match the checkpoint at "
                          f"{req.path} (model_index.json names {found}); allowed: {found}")
    if req.kind == "text" and not req.prompts:
        raise ConfigError("pipeline.prompts=[] and no pipeline.prompt_file; allowed: at least "
                          "one prompt")
    if req.kind == "image":
        if not req.image or not Path(req.image).expanduser().is_file():
            raise ConfigError(f"pipeline.image={req.image!r}: no such file; allowed: the path "
                              f"of the conditioning image {req.cls} needs")
        if req.prompts:
            raise ConfigError(f"pipeline.prompts: {req.cls} is conditioned on pipeline.image "
                              "and takes no prompt; allowed: []")


def library_bars() -> None:
    """diffusers' and transformers' loading bars on a terminal only (their own switch; they
    do not ask the stream, as tqdm's ``disable=None`` does): a log file gets none."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    terminal = sys.stderr.isatty()
    for lib in (dlog, tlog):
        (lib.enable_progress_bar if terminal else lib.disable_progress_bar)()


def load(req: Request, lazy: bool = False):
    """The pipeline, from the local directory only, in the request's dtype, in eval mode;
    ``lazy``: its denoiser on the meta device, for the distributed drop-in to load stage by
    stage (``asyncdiff/dropin/lazy.py``)."""
    from diffusers import DiffusionPipeline

    from asyncdiff import load_pipeline

    library_bars()
    pipe = load_pipeline(req.path, dtype=DTYPES[req.dtype]) if lazy else \
        DiffusionPipeline.from_pretrained(req.path, local_files_only=True,
                                          dtype=DTYPES[req.dtype])
    if type(pipe).__name__ != req.cls:  # a model_index.json edited after the check
        raise ConfigError(f"pipeline.cls={req.cls!r}; the checkpoint loaded as "
                          f"{type(pipe).__name__}; allowed: {type(pipe).__name__}")
    return pipe


def _kwargs(req: Request, prompt: str | None, seed: int) -> dict:
    kw: dict[str, Any] = {"num_inference_steps": req.steps, "output_type": "pt",
                          "generator": torch.Generator().manual_seed(seed)}
    if req.kind == "text":
        kw["prompt"] = prompt
        if req.negative_prompt is not None:
            kw["negative_prompt"] = req.negative_prompt
        if req.guidance is not None:
            kw["guidance_scale"] = req.guidance
    else:
        from PIL import Image
        kw["image"] = Image.open(Path(req.image).expanduser()).convert("RGB")
        if req.guidance is not None:  # SVD's guidance ramps from 1 to max_guidance_scale
            kw["max_guidance_scale"] = req.guidance
    for key, value in (("height", req.height), ("width", req.width),
                       ("num_frames", req.frames)):
        if value is not None:
            kw[key] = value
    return {**kw, **req.call}


def generate(pipe, req: Request, label: str | None = None,
             bar: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Every item's decoded output, stacked (``[items, 3, H, W]`` for images, ``[items, F, 3,
    H, W]`` for video; values in [0, 1], float32 on the CPU), and each call's seconds.
    ``label`` names the generation on the pipeline's own progress bar over the steps, drawn
    (``bar``) on a terminal only (tqdm's ``disable=None``)."""
    outs, seconds = [], []
    for i, (prompt, seed) in enumerate(req.items):
        pipe.set_progress_bar_config(
            disable=None if bar else True, leave=False, unit="step",
            desc=f"{label}, item {i + 1}/{len(req.items)}" if label else None)
        t0 = time.perf_counter()
        result = pipe(**_kwargs(req, prompt, seed))
        seconds.append(time.perf_counter() - t0)
        pixels = result.frames if hasattr(result, "frames") else result.images
        outs.append(torch.as_tensor(pixels)[0].detach().float().cpu())
    return torch.stack(outs), seconds
