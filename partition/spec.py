"""What a denoiser takes: named example inputs and the role each one plays.

The compiler needs to know which input is the latent (everything that depends on it is the
*trunk* and gets cut into stages) and which is the timestep (conditioning computed from it is
replicated, never sent; see [Note: staleness] in ``asyncdiff/timeline.py``).

Roles: ``latent`` (exactly one: x, what the scheduler updates), ``timestep``, ``cond``
(conditioning that stays the same for a whole sampling run: text embeddings, class labels,
a control image; what depends on it alone is computed once per run, see ``partition.graph``),
and ``per_step`` (anything else the pipeline passes anew at every step, such as ControlNet
residuals or a second latent: like the latent, what depends on it is trunk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["latent", "timestep", "cond", "per_step"]
ROLES: tuple[str, ...] = ("latent", "timestep", "cond", "per_step")


@dataclass(frozen=True)
class InputSpec:
    """One keyword input of a denoiser's ``forward``.

    ``name`` is the keyword; a dotted name is a nested entry, so
    ``added_cond_kwargs.text_embeds`` becomes ``added_cond_kwargs={"text_embeds": ...}`` and
    ``image_rotary_emb.0``, ``image_rotary_emb.1`` become ``image_rotary_emb=(..., ...)``.
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
    """``{"a.b": v}`` -> ``{"a": {"b": v}}``: dotted input names become nested keyword inputs;
    a level whose keys are exactly ``0 … n-1`` becomes a tuple (``{"r.0": c, "r.1": s}`` ->
    ``{"r": (c, s)}``)."""
    return {k: _tuples(v) for k, v in _nest_dicts(flat).items()}


def _nest_dicts(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split(".")
        level = out
        for part in path:
            level = level.setdefault(part, {})
        level[leaf] = value
    return out


def _tuples(value):
    if not isinstance(value, dict):
        return value
    value = {k: _tuples(v) for k, v in value.items()}
    if value and set(value) == {str(i) for i in range(len(value))}:
        return tuple(value[str(i)] for i in range(len(value)))
    return value


def call_denoiser(module, inputs: dict, contract=None, specs=()):
    """Call ``module`` with named (possibly dotted) inputs and return the noise prediction.

    ``contract`` (:class:`partition.contract.DenoiserContract`) says how the network is
    called and which output is ε; by default diffusers models get ``return_dict=False`` and
    the first entry of what they return (a tuple, an output dataclass, a tensor) is ε.
    ``specs`` name the latent and timestep inputs the contract refers to.
    """
    from partition.contract import DenoiserContract

    contract = contract or DenoiserContract()
    latent = next((s.name for s in specs if s.role == "latent"), None)
    timestep = next((s.name for s in specs if s.role == "timestep"), None)
    return contract.call(module, nest(dict(inputs)), latent, timestep)
