"""Model inputs of one stage run: the latent, the timestep it is fed, the conditioning."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from partition.spec import InputSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}


def timestep_tensor(spec: InputSpec, value: torch.Tensor | float) -> torch.Tensor:
    """τ as the captured graph expects it: the spec's shape and dtype (export specialises on
    both, and an int64 scheduler timestep would take another path through the embedding).
    A tensor of exactly that shape and dtype is the value itself (what a pipeline passed, bit
    for bit: the drop-in); anything else is a number filled into that shape."""
    if isinstance(value, torch.Tensor) and tuple(value.shape) == spec.shape \
            and value.dtype == DTYPES[spec.dtype]:
        return value
    return torch.full(spec.shape, float(value), dtype=DTYPES[spec.dtype])


def model_env(specs: tuple[InputSpec, ...], placeholders: Mapping[str, str], x: torch.Tensor,
              t: torch.Tensor | float, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inputs keyed by the captured graph's placeholder names."""
    env = {}
    for s in specs:
        if s.role == "latent":
            value = x
        elif s.role == "timestep":
            value = timestep_tensor(s, t).to(x.device)
        else:
            if s.name not in cond:
                raise ValueError(f"cond: missing input {s.name!r}; the model takes "
                                 f"{[p.name for p in specs if p.role == 'cond']}")
            value = cond[s.name]
        if tuple(value.shape) != s.shape:
            raise ValueError(f"input {s.name!r} has shape {tuple(value.shape)}, the plan was "
                             f"captured for {s.shape} (one capture per shape)")
        env[placeholders[s.name]] = value
    return env
