"""Where a diffusers pipeline holds its denoisers: the attributes the drop-in parallelizes."""
from __future__ import annotations

from typing import Any

from torch import nn

# in order: a pipeline's every denoiser among these is parallelized unless some are named
DENOISERS: tuple[str, ...] = ("unet", "transformer", "transformer_2", "unet_2")


def find_denoisers(pipe: Any, attr: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """Every denoiser the pipeline holds (one that is None, such as Wan 2.2's optional
    second denoiser, is skipped), or the ones named."""
    names = (attr,) if isinstance(attr, str) else tuple(attr) if attr else DENOISERS
    found = tuple(n for n in names if isinstance(getattr(pipe, n, None), nn.Module))
    if not found or (attr and len(found) != len(names)):
        raise ValueError(f"{type(pipe).__name__} has no denoiser module at "
                         f"{' or '.join('pipe.' + n for n in names)}; pass "
                         "denoiser='<attribute>'")
    return found
