"""Each rank holds only its own stage, from start-up on.

:func:`load_pipeline` loads a diffusers pipeline from a local checkpoint with every denoiser
built on the meta device from its config: not one of its weights is read or allocated. The
distributed drop-in then captures such a denoiser on the meta device (``torch.export`` needs
shapes, not values), costs it by FLOPs over fake tensors, plans on rank 0, and each rank reads
from the checkpoint's safetensors only the tensors its own stage holds (:func:`materialise`).

What cannot be done this way, and is said, not skipped silently: no process ever holds the
whole denoiser, so the split is not verified against the eager model (the plan's
``verification`` says so and a warning is logged; a run with the denoiser loaded whole
verifies the same split: the plans are the same). The module backend and the ``time`` and
``fvcore`` cost models need real weights and are refused.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from partition.capture import retarget_devices
from partition.stages import Segment

CHECKPOINT_ATTR = "_asyncdiff_checkpoint"  # set on a meta denoiser: where its weights are
PREFIX = "model."  # captured graphs hold the denoiser under this attribute (PositionalDenoiser)
UNVERIFIED = ("off: the denoiser was loaded lazily (on the meta device; each rank read only "
              "its own stage's weights), so no process held it whole to verify the split "
              "against; load it whole once to verify the same split")


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


class Checkpoint:
    """The safetensors of one diffusers model folder (one file, or shards with an index),
    read tensor by tensor: ``safetensors.safe_open`` maps the file and copies out only the
    tensors asked for (diffusers' own loaders read whole files)."""

    def __init__(self, folder: str | os.PathLike, variant: str | None = None):
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
        from diffusers.utils import _add_variant

        self.folder = Path(folder)
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


def materialise(parts: list[Segment], checkpoint: Checkpoint,
                device: torch.device | str) -> list[Segment]:
    """Fill this rank's segments with their own tensors from ``checkpoint`` (in the dtype the
    meta denoiser was built in) and point the graphs at ``device``; a meta tensor left over
    (one the checkpoint does not hold, such as a value made at capture) is an error."""
    for part in parts:
        want = {name: t for name, t in _tensors(part.gm) if t.is_meta}
        keys = {name: name.removeprefix(PREFIX) for name in want}
        values = checkpoint.read(sorted(set(keys.values())))
        for name, t in want.items():
            value = values[keys[name]]
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"{checkpoint.folder}: tensor {keys[name]!r} has shape "
                                 f"{tuple(value.shape)}, the denoiser's config gives "
                                 f"{tuple(t.shape)}")
            _assign(part.gm, name, value.to(device=device, dtype=t.dtype))
        left = [name for name, t in _tensors(part.gm) if t.is_meta]
        if left:
            raise RuntimeError(f"stage {part.stage}: {left[0]!r} is still on the meta device "
                               "after loading: the module makes it in its constructor or "
                               "forward; load this denoiser whole")
        retarget_devices(part.gm, device)
    return parts


def _tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in [*gm.named_parameters(remove_duplicate=False),
                                *gm.named_buffers(remove_duplicate=False)]]


def _assign(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def load_pipeline(path: str | os.PathLike, *, denoisers: Iterable[str] | None = None,
                  torch_dtype: torch.dtype | None = None, variant: str | None = None,
                  **kwargs):
    """``DiffusionPipeline.from_pretrained(path, local_files_only=True, …)`` with each
    denoiser component (``unet``, ``transformer``, … or those named) built on the meta device
    from its config, its checkpoint folder recorded for :func:`materialise`. Everything else
    (text encoders, VAE, scheduler) loads as usual."""
    from diffusers import DiffusionPipeline

    from asyncdiff.parallelize import DENOISERS

    index = DiffusionPipeline.load_config(str(path), local_files_only=True)
    names = tuple(denoisers) if denoisers is not None else \
        tuple(n for n in DENOISERS if isinstance(index.get(n), list) and index[n][1])
    if not names:
        raise ValueError(f"{path}: model_index.json names no denoiser among "
                         f"{', '.join(DENOISERS)}; pass denoisers=[…]")
    skeletons = {n: skeleton(path, n, index, torch_dtype, variant) for n in names}
    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True,
                                             torch_dtype=torch_dtype, variant=variant,
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
    if dtype is not None:
        model = model.to(dtype)
    model.eval().requires_grad_(False)
    setattr(model, CHECKPOINT_ATTR, Checkpoint(Path(path) / name, variant))
    return model
