"""How a denoiser is called and what it returns: declared as data, never as a wrapper module.

[Note: denoiser contract]
~~~~~~~~~~~~~~~~~~~~~~~~~
The compiler and the runtime see a denoiser as ε = f(latent, timestep, conditioning): named
tensor inputs in (:class:`partition.spec.InputSpec`), ONE tensor out, for a timestep in the
scheduler's units. A released network rarely has exactly that signature. Rather than a
wrapper ``nn.Module`` (which adds ``model.`` to every module path, so ``depth`` and every
manual boundary shift), a :class:`DenoiserContract` says how to call the user's own module:

* ``timestep_scale``, ``timestep_offset``: the network is fed ``scale · t + offset`` (Flux
  takes t / 1000; Lumina and Z-Image 1 − t / 1000). The timestep's dtype and shape (a
  per-frame vector, a batch) are those of its ``InputSpec``;
* ``static``: fixed keyword arguments that are not tensors (``num_frames``, ``fps``, flags);
* ``concat``: the network's latent input is the latent concatenated with other inputs along
  ``dim`` (SVD's image latents), as the pipeline does;
* ``output``: which part of what the network returns is the prediction: ``index`` into a
  tuple (default 0; a list is a path, ``[0, 0]`` = ``out[0][0]`` for a network that returns
  per-sample lists), or ``field`` of an output dataclass (default: its first field);
  ``stack: true`` when that is a list of per-sample tensors; ``negate: true`` when the
  pipeline negates it (Lumina, Z-Image predict −ε);
* ``narrow``: the prediction is a slice of that output along ``dim``: ``length`` entries from
  ``start`` (default 0; negative counts from the end). A learned-σ network emits
  ``[ε, variance]``: ε is the first ``length`` channels, what its pipeline keeps; a network
  that also predicts text tokens keeps the latent's tokens;
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

CONTRACT_KEYS: tuple[str, ...] = ("timestep_scale", "timestep_offset", "static", "concat",
                                  "output", "narrow")


class ContractError(ValueError):
    """The network's call or output does not match its contract (names the key to write)."""


@dataclass(frozen=True)
class DenoiserContract:
    """See [Note: denoiser contract]. The default is a plain ``ε = model(**inputs)``."""

    timestep_scale: float | None = None
    timestep_offset: float | None = None
    static: Mapping[str, Any] = field(default_factory=dict)
    concat_inputs: tuple[str, ...] = ()
    concat_dim: int | None = None
    output_index: int | tuple[int, ...] = 0   # a path into nested lists: (0, 0) = out[0][0]
    output_field: str | None = None
    output_stack: bool = False
    output_negate: bool = False
    narrow_dim: int | None = None
    narrow_length: int | None = None
    narrow_start: int = 0

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
        bad = sorted(set(output) - {"index", "field", "stack", "negate"})
        if bad or ("index" in output and "field" in output):
            raise ContractError(f"{where}.output: {output}; allowed: index: <int> or field: "
                                "<name>, and stack: <bool>, negate: <bool>")
        narrow = _block(d, "narrow", ("dim", "length"), where, optional=("start",))
        static = d.get("static") or {}
        if not isinstance(static, Mapping):
            raise ContractError(f"{where}.static: {static!r}; allowed: a mapping of keyword "
                                "arguments")
        number = {}
        for key in ("timestep_scale", "timestep_offset"):
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ContractError(f"{where}.{key}={v!r}; allowed: a number")
            number[key] = None if v is None else float(v)
        return cls(**number, static=dict(static),
                   concat_inputs=tuple(concat["inputs"]) if concat else (),
                   concat_dim=int(concat["dim"]) if concat else None,
                   output_index=_index(output.get("index", 0), where),
                   output_field=output.get("field"),
                   output_stack=bool(output.get("stack", False)),
                   output_negate=bool(output.get("negate", False)),
                   narrow_dim=int(narrow["dim"]) if narrow else None,
                   narrow_length=int(narrow["length"]) if narrow else None,
                   narrow_start=int(narrow.get("start", 0)) if narrow else 0)

    def to_config(self) -> dict:
        out: dict[str, Any] = {}
        if self.timestep_scale is not None:
            out["timestep_scale"] = self.timestep_scale
        if self.timestep_offset is not None:
            out["timestep_offset"] = self.timestep_offset
        if self.static:
            out["static"] = dict(self.static)
        if self.concat_inputs:
            out["concat"] = {"inputs": list(self.concat_inputs), "dim": self.concat_dim}
        index = list(self.output_index) if isinstance(self.output_index, tuple) \
            else self.output_index
        output = {"field": self.output_field} if self.output_field is not None else \
            {"index": index} if self.output_index else {}
        output.update({k: True for k, on in (("stack", self.output_stack),
                                             ("negate", self.output_negate)) if on})
        if output:
            out["output"] = output
        if self.narrow_dim is not None:
            out["narrow"] = {"dim": self.narrow_dim, "length": self.narrow_length,
                             **({"start": self.narrow_start} if self.narrow_start else {})}
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
        if timestep is not None and self.timestep_scale is not None:
            kwargs[timestep] = kwargs[timestep] * self.timestep_scale
        if timestep is not None and self.timestep_offset is not None:
            kwargs[timestep] = kwargs[timestep] + self.timestep_offset
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
            path = self.output_index if isinstance(self.output_index, tuple) \
                else (self.output_index,)
            for i in path:
                if not isinstance(out, (tuple, list)) or not -len(out) <= i < len(out):
                    raise ContractError(f"contract.output.index={self.output_index}: the "
                                        f"network's output has no entry {i} there "
                                        f"({type(out).__name__})")
                out = out[i]
        elif dataclasses.is_dataclass(out):
            out = getattr(out, dataclasses.fields(out)[0].name)
        elif hasattr(out, "sample") and not isinstance(out, torch.Tensor):
            out = out.sample
        if self.output_stack and isinstance(out, (list, tuple)):
            out = torch.stack(list(out))
        if not isinstance(out, torch.Tensor):
            raise ContractError(f"the network's prediction is {type(out).__name__}, not a "
                                "tensor; say which output is ε with contract.output "
                                "({index: <i>} or {field: <name>})")
        if self.narrow_dim is not None:
            start = self.narrow_start % out.shape[self.narrow_dim]
            out = out.narrow(self.narrow_dim, start, self.narrow_length)
        return -out if self.output_negate else out


def _index(value, where: str) -> int | tuple[int, ...]:
    """``output.index``: an int, or a list of ints (a path into nested lists)."""
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)) or (
            not isinstance(value, int) and not all(isinstance(i, int) for i in value)):
        raise ContractError(f"{where}.output.index={value!r}; allowed: an integer or a list of "
                            "integers (a path: [0, 0] is out[0][0])")
    return value if isinstance(value, int) else tuple(value)


def _block(d: Mapping, key: str, fields: tuple[str, ...], where: str,
           optional: tuple[str, ...] = ()) -> dict | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping) or not set(fields) <= set(value) <= {*fields, *optional}:
        also = f" (and optionally {', '.join(optional)})" if optional else ""
        raise ContractError(f"{where}.{key}: {value!r}; allowed: a mapping with "
                            f"{', '.join(fields)}{also}")
    return dict(value)


def _takes(module: Any, name: str) -> bool:
    forward = getattr(module, "forward", module)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params
