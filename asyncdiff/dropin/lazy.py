"""Each rank holds only its own stage, from start-up on.

:func:`load_pipeline` loads a diffusers pipeline from a local checkpoint with every denoiser
built on the meta device from its config: not one of its weights is read or allocated. On
the first call the distributed drop-in gives such a denoiser *hollow* storage on the call's
device (:func:`hollow`: ``Module.to_empty``, memory reserved but never written or read, so
the OS commits none of it), captures it exactly as a loaded one (``torch.export`` reads
shapes, not values: the graph and the plan are the very ones a whole load gives), costs it by
FLOPs over fake tensors, plans on rank 0, and each rank reads from the checkpoint's
safetensors only the tensors its own stage holds (:func:`materialise`); the hollow rest is
released with the other stages' weights (``offload="drop"``).

What cannot be done this way, and is said, not skipped silently: no process ever holds the
whole denoiser, so the split is not verified against the eager model (the plan's
``verification`` says so and a warning is logged; a run with the denoiser loaded whole
verifies the same split: the plans are the same). Whatever would read weight values before
the stages are loaded is refused: the module backend, the ``time`` and ``fvcore`` cost
models, and a cost pass whose shapes depend on values.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from asyncdiff.dropin.denoisers import DENOISERS
from partition.stages import Segment

CHECKPOINT_ATTR = "_asyncdiff_checkpoint"  # set on a meta denoiser: where its weights are
PREFIX = "model."  # captured graphs hold the denoiser under this attribute (PositionalDenoiser)
UNVERIFIED = ("off: the denoiser was loaded lazily (on the meta device; each rank read only "
              "its own stage's weights), so no process held it whole to verify the split "
              "against; load it whole once to verify the same split")


class Checkpoint:
    """The safetensors of one diffusers model folder (one file, or shards with an index),
    read tensor by tensor: ``safetensors.safe_open`` maps the file and copies out only the
    tensors asked for (diffusers' loaders load every tensor of the model)."""

    def __init__(self, folder: str | os.PathLike, variant: str | None = None,
                 made: dict[str, torch.Tensor] | None = None):
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
        from diffusers.utils import _add_variant

        self.folder = Path(folder)
        # tensors the model's constructor made on the CPU despite the meta device (a legacy
        # ``torch.Tensor([…])`` buffer): hollow() keeps those the file does not hold
        self.made = dict(made or {})
        single = self.folder / _add_variant(SAFETENSORS_WEIGHTS_NAME, variant)
        index = self.folder / _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        elif index.is_file():
            shards = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.folder / name for k, name in shards.items()}
        else:
            raise FileNotFoundError(f"no {single.name} or {index.name} in {self.folder}: lazy "
                                    "loading reads a diffusers model folder's safetensors")

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        keys = list(keys)
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise KeyError(f"{self.folder}: no tensor {missing[0]!r} in the checkpoint "
                           f"({len(missing)} missing): it does not match the denoiser's config")
        out: dict[str, torch.Tensor] = {}
        for file in sorted({self.files[k] for k in keys}):
            with safe_open(str(file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys if self.files[k] == file})
        return out


def hollow(module: nn.Module, device: torch.device | str, checkpoint: Checkpoint) -> set[int]:
    """Give a meta ``module`` uninitialised storage on ``device``, except the tensors its
    constructor made that the checkpoint does not hold (they keep their values); return the
    ids of the hollow tensors, which must never be read."""
    module.to_empty(device=device)
    kept = {n: v for n, v in checkpoint.made.items() if n not in checkpoint.files}
    for name, value in kept.items():
        _assign(module, name, value.to(device), _get(module, name))
    return {id(t) for n, t in _tensors(module) if n not in kept}


def materialise(parts: list[Segment], checkpoint: Checkpoint, hollows: set[int],
                device: torch.device | str) -> list[Segment]:
    """Replace every hollow tensor of this rank's segments by the checkpoint's (in the dtype
    the denoiser was built in, on ``device``); one left hollow is an error."""
    for part in parts:
        want = {name: t for name, t in _tensors(part.gm) if id(t) in hollows}
        keys = {name: name.removeprefix(PREFIX) for name in want}
        values = checkpoint.read(sorted(set(keys.values())))
        for name, t in want.items():
            value = values[keys[name]]
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"{checkpoint.folder}: tensor {keys[name]!r} has shape "
                                 f"{tuple(value.shape)}, the denoiser's config gives "
                                 f"{tuple(t.shape)}")
            _assign(part.gm, name, value.to(device=device, dtype=t.dtype), t)
        left = [name for name, t in _tensors(part.gm) if id(t) in hollows]
        if left:
            raise RuntimeError(f"stage {part.stage}: {left[0]!r} was not loaded from "
                               f"{checkpoint.folder}; load this denoiser whole")
    return parts


def _tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*gm.named_parameters(remove_duplicate=False),
            *gm.named_buffers(remove_duplicate=False)]


def _get(module: nn.Module, name: str) -> torch.Tensor:
    path, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(path), leaf)


def _assign(gm: nn.Module, name: str, value: torch.Tensor, meta: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(path)
    if leaf in owner._parameters:
        # the flag as the loaded model has it: matmul picks its kernel by ``requires_grad``
        # (folding to mm or not), so the values would differ in the last bits without it
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=meta.requires_grad)
    else:
        owner._buffers[leaf] = value


def load_pipeline(path: str | os.PathLike, *, denoisers: Iterable[str] | None = None,
                  dtype: torch.dtype | None = None, variant: str | None = None,
                  **kwargs):
    """``DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=…, …)`` with each
    denoiser component (``unet``, ``transformer``, … or those named) built on the meta device
    from its config, its checkpoint folder recorded for :func:`materialise`. Everything else
    (text encoders, VAE, scheduler) loads as usual."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(path), local_files_only=True)
    names = tuple(denoisers) if denoisers is not None else \
        tuple(n for n in DENOISERS if isinstance(index.get(n), list) and index[n][1])
    if not names:
        raise ValueError(f"{path}: model_index.json names no denoiser among "
                         f"{', '.join(DENOISERS)}; pass denoisers=[…]")
    skeletons = {n: skeleton(path, n, index, dtype, variant) for n in names}
    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True,
                                             dtype=dtype, variant=variant,
                                             **skeletons, **kwargs)


def skeleton(path: str | os.PathLike, name: str, index: dict, dtype: torch.dtype | None,
             variant: str | None) -> nn.Module:
    """The model of component ``name`` built from its config on the meta device."""
    import importlib

    library, cls_name = index[name]
    cls = getattr(importlib.import_module(library), cls_name)
    config = cls.load_config(str(path), subfolder=name, local_files_only=True)
    with torch.device("meta"):
        model = cls.from_config(config)
    if dtype is not None and dtype != model.dtype:  # (diffusers warns at every cast)
        model = model.to(dtype)
    made = {n: t.detach().clone() for n, t in _tensors(model) if not t.is_meta}
    model.to("meta").eval()  # one device: hollow() gives all of it storage at the first call
    setattr(model, CHECKPOINT_ATTR, Checkpoint(Path(path) / name, variant, made))
    return model
