"""What a denoiser takes: named example inputs and the role each one plays.

The compiler needs to know which input is the latent (everything that depends on it is the
*trunk* and gets cut into stages) and which is the timestep (conditioning computed from it is
replicated, never sent; see [Note: staleness] in ``asyncdiff/timeline.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["latent", "timestep", "cond"]
ROLES: tuple[str, ...] = ("latent", "timestep", "cond")


@dataclass(frozen=True)
class InputSpec:
    """One keyword input of a denoiser's ``forward``.

    ``name`` is the keyword; a dotted name is a nested dict entry, so
    ``added_cond_kwargs.text_embeds`` becomes ``added_cond_kwargs={"text_embeds": ...}``.
    ``init`` says how an example value is drawn: ``randn``, ``timestep`` (a value in
    [0, 1000)), ``randint:<high>``, ``zeros``, ``ones``, ``ids2d:<h>:<w>`` (Flux image ids) or
    ``ids_zeros`` (Flux text ids).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    role: Role = "cond"
    init: str = "randn"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"input {self.name!r}: role={self.role!r}; allowed: {', '.join(ROLES)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "role": self.role, "init": self.init}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(name=d["name"], shape=tuple(d["shape"]), dtype=d.get("dtype", "float32"),
                   role=d.get("role", "cond"), init=d.get("init", "randn"))


def latent_name(specs: tuple[InputSpec, ...] | list[InputSpec]) -> str:
    names = [s.name for s in specs if s.role == "latent"]
    if len(names) != 1:
        raise ValueError(f"inputs: exactly one input must have role 'latent', got {names}")
    return names[0]


def timestep_name(specs: tuple[InputSpec, ...] | list[InputSpec]) -> str | None:
    names = [s.name for s in specs if s.role == "timestep"]
    if len(names) > 1:
        raise ValueError(f"inputs: at most one input may have role 'timestep', got {names}")
    return names[0] if names else None


def nest(flat: dict) -> dict:
    """``{"a.b": v}`` -> ``{"a": {"b": v}}``: dotted input names become nested keyword dicts."""
    out: dict = {}
    for key, value in flat.items():
        head, *rest = key.split(".")
        if rest:
            out.setdefault(head, {})
            out[head] = {**out[head], **nest({".".join(rest): value})}
        else:
            out[head] = value
    return out


def call_denoiser(module, inputs: dict):
    """Call ``module`` with named (possibly dotted) inputs and return the noise prediction.

    diffusers models get ``return_dict=False`` and return a tuple whose first entry is the
    prediction; plain modules may return a tensor, a tuple or an object with ``.sample``.
    """
    import inspect

    kwargs = nest(dict(inputs))
    forward = getattr(module, "forward", module)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "return_dict" in params:
        kwargs["return_dict"] = False
    out = module(**kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "sample"):
        out = out.sample
    return out
