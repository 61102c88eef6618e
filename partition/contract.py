"""How a denoiser is called and what it returns: declared as data, never as a wrapper module.

[Note: denoiser contract]
~~~~~~~~~~~~~~~~~~~~~~~~~
The compiler and the runtime see a denoiser as ε = f(latent, timestep, conditioning): named
tensor inputs in (:class:`partition.spec.InputSpec`), ONE tensor out, for a timestep in the
scheduler's units. A released network rarely has exactly that signature. Rather than a
wrapper ``nn.Module`` (which adds ``model.`` to every module path, so ``depth`` and every
manual boundary shift), a :class:`DenoiserContract` says how to call the user's own module:

* ``timestep_scale``: the network is fed ``scale · t`` (Flux takes t / 1000; a network that
  wants 0–1 instead of 0–999). The timestep's dtype and shape (a per-frame vector, a batch)
  are those of its ``InputSpec``;
* ``static``: fixed keyword arguments that are not tensors (``num_frames``, ``fps``, flags);
* ``concat``: the network's latent input is the latent concatenated with other inputs along
  ``dim`` (SVD's image latents), as the pipeline does;
* ``output``: which part of what the network returns is the prediction: ``index`` into a
  tuple (default 0), or ``field`` of an output dataclass (default: its first field);
* ``narrow``: the prediction is a slice of that output along ``dim`` (a learned-σ network
  emits ``[ε, variance]``: ε is the first ``length`` channels, what its pipeline keeps; a
  network that also predicts conditioning tokens keeps the latent's tokens);
* the prediction may have another shape or dtype than the latent (token logits): the plan
  records the output's shape and dtype and the runtime sends exactly that.

Inputs that are tuples (a rotary ``(cos, sin)`` pair) are named by index:
``image_rotary_emb.0``, ``image_rotary_emb.1`` (:func:`partition.spec.nest`). Inputs the
pipeline passes anew at every step besides the latent (ControlNet residuals, a second latent)
have role ``per_step``. Module paths in plans, ``depth`` and manual splits always refer to the
user's own module: the contract is applied around its ``forward``, not by wrapping it.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

CONTRACT_KEYS: tuple[str, ...] = ("timestep_scale", "static", "concat", "output", "narrow")


class ContractError(ValueError):
    """The network's call or output does not match its contract (names the key to write)."""


@dataclass(frozen=True)
class DenoiserContract:
    """See [Note: denoiser contract]. The default is a plain ``ε = model(**inputs)``."""

    timestep_scale: float | None = None
    static: Mapping[str, Any] = field(default_factory=dict)
    concat_inputs: tuple[str, ...] = ()
    concat_dim: int | None = None
    output_index: int = 0
    output_field: str | None = None
    narrow_dim: int | None = None
    narrow_length: int | None = None

    # --- config ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, d: Mapping | None, where: str = "model.contract") -> "DenoiserContract":
        """From the YAML block (``timestep_scale``, ``static``, ``concat: {inputs, dim}``,
        ``output: {index | field}``, ``narrow: {dim, length}``); unknown keys are an error."""
        d = dict(d or {})
        unknown = sorted(set(d) - set(CONTRACT_KEYS))
        if unknown:
            raise ContractError(f"{where}: unknown key(s) {unknown}; allowed: "
                                f"{', '.join(CONTRACT_KEYS)}")
        concat = _block(d, "concat", ("inputs", "dim"), where)
        output = dict(d.get("output") or {})
        bad = sorted(set(output) - {"index", "field"})
        if bad or ("index" in output and "field" in output):
            raise ContractError(f"{where}.output: {output}; allowed: {{index: <int>}} or "
                                "{field: <name>}")
        narrow = _block(d, "narrow", ("dim", "length"), where)
        static = d.get("static") or {}
        if not isinstance(static, Mapping):
            raise ContractError(f"{where}.static: {static!r}; allowed: a mapping of keyword "
                                "arguments")
        scale = d.get("timestep_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise ContractError(f"{where}.timestep_scale={scale!r}; allowed: a number")
        return cls(timestep_scale=None if scale is None else float(scale), static=dict(static),
                   concat_inputs=tuple(concat["inputs"]) if concat else (),
                   concat_dim=int(concat["dim"]) if concat else None,
                   output_index=int(output.get("index", 0)), output_field=output.get("field"),
                   narrow_dim=int(narrow["dim"]) if narrow else None,
                   narrow_length=int(narrow["length"]) if narrow else None)

    def to_config(self) -> dict:
        out: dict[str, Any] = {}
        if self.timestep_scale is not None:
            out["timestep_scale"] = self.timestep_scale
        if self.static:
            out["static"] = dict(self.static)
        if self.concat_inputs:
            out["concat"] = {"inputs": list(self.concat_inputs), "dim": self.concat_dim}
        if self.output_field is not None:
            out["output"] = {"field": self.output_field}
        elif self.output_index:
            out["output"] = {"index": self.output_index}
        if self.narrow_dim is not None:
            out["narrow"] = {"dim": self.narrow_dim, "length": self.narrow_length}
        return out

    def __bool__(self) -> bool:
        return bool(self.to_config())

    # --- the call --------------------------------------------------------------------------
    def call(self, module: torch.nn.Module, kwargs: dict, latent: str,
             timestep: str | None) -> torch.Tensor:
        """``module`` called with the nested keyword inputs ``kwargs``; returns ε."""
        kwargs = dict(kwargs)
        if self.concat_inputs:
            missing = [n for n in self.concat_inputs if n not in kwargs]
            if missing:
                raise ContractError(f"contract.concat.inputs: {missing} are not inputs of the "
                                    f"call; inputs: {sorted(kwargs)}")
            extra = [kwargs.pop(n) for n in self.concat_inputs]
            kwargs[latent] = torch.cat([kwargs[latent], *extra], dim=self.concat_dim)
        if self.timestep_scale is not None and timestep is not None:
            kwargs[timestep] = kwargs[timestep] * self.timestep_scale
        clash = sorted(set(self.static) & set(kwargs))
        if clash:
            raise ContractError(f"contract.static: {clash} are also tensor inputs; give each "
                                "argument once")
        kwargs.update(self.static)
        if "return_dict" not in kwargs and _takes(module, "return_dict"):
            kwargs["return_dict"] = False
        return self.prediction(module(**kwargs))

    def prediction(self, out: Any) -> torch.Tensor:
        """ε from what the network returned."""
        if self.output_field is not None:
            if not hasattr(out, self.output_field):
                raise ContractError(f"contract.output.field={self.output_field!r}: the network "
                                    f"returned {type(out).__name__}, which has no such field")
            out = getattr(out, self.output_field)
        elif isinstance(out, (tuple, list)):
            if not -len(out) <= self.output_index < len(out):
                raise ContractError(f"contract.output.index={self.output_index}: the network "
                                    f"returned a {type(out).__name__} of {len(out)}")
            out = out[self.output_index]
        elif dataclasses.is_dataclass(out):
            out = getattr(out, dataclasses.fields(out)[0].name)
        elif hasattr(out, "sample") and not isinstance(out, torch.Tensor):
            out = out.sample
        if not isinstance(out, torch.Tensor):
            raise ContractError(f"the network's prediction is {type(out).__name__}, not a "
                                "tensor; say which output is ε with contract.output "
                                "({index: <i>} or {field: <name>})")
        if self.narrow_dim is not None:
            out = out.narrow(self.narrow_dim, 0, self.narrow_length)
        return out


def _block(d: Mapping, key: str, fields: tuple[str, ...], where: str) -> dict | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != set(fields):
        raise ContractError(f"{where}.{key}: {value!r}; allowed: a mapping with exactly "
                            f"{', '.join(fields)}")
    return dict(value)


def _takes(module: Any, name: str) -> bool:
    forward = getattr(module, "forward", module)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params
