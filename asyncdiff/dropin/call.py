"""One denoiser call of a pipeline, as the compiler sees it.

A diffusers pipeline calls its denoiser with any pytree of tensors: nested dicts
(``added_cond_kwargs``), lists and tuples (ControlNet's ``down_block_additional_residuals``,
IP-Adapter's ``image_embeds``, HunyuanDiT's rotary ``(cos, sin)``), ``None`` and flags.
:func:`bind_call` splits the call into *named tensor inputs* (dotted names: ``a.b`` for a dict
entry, ``a.0`` for a sequence entry; nested again by :func:`partition.spec.nest`), which become
the captured graph's inputs, and the *static* rest, which is baked into the capture (a
different static part is another capture, like a different shape). A sequence keeps its type,
its length and its non-tensor entries in the static part (:class:`Seq`), so :func:`merge`
rebuilds exactly what the pipeline passed. The latent is the forward's first parameter (``sample``,
``hidden_states``); the timestep is the parameter named ``timestep``.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from asyncdiff.guidance import half_of
from partition.spec import InputSpec

TIMESTEP = "timestep"
_TENSOR = object()  # marks a leaf that went to the tensor inputs


@dataclass(frozen=True)
class Seq:
    """The static part of a list or tuple that held tensors: its type, its length and its
    other entries by index (the tensors are inputs named ``<name>.<index>``)."""

    kind: type
    length: int
    items: tuple[tuple[int, Any], ...]

    def rebuild(self, tensors: Mapping | tuple | list | None) -> list | tuple:
        given = dict(enumerate(tensors)) if isinstance(tensors, (tuple, list)) else \
            {int(k): v for k, v in (tensors or {}).items()}
        static = dict(self.items)
        out = []
        for i in range(self.length):
            if i in static and i in given:
                out.append(merge(static[i], given[i]) if isinstance(static[i], Mapping)
                           else static[i].rebuild(given[i]))
            else:
                out.append(given[i] if i in given else static[i])
        return self.kind(*out) if hasattr(self.kind, "_fields") else self.kind(out)


@dataclass(frozen=True, eq=False)
class Call:
    """``tensors``: dotted name -> tensor, in signature order; ``static``: the rest, nested."""

    tensors: dict[str, torch.Tensor]
    static: dict[str, Any]
    latent: str
    timestep: str

    @property
    def key(self) -> tuple:
        """What a capture is specialised on: names, shapes, dtypes, devices, static arguments."""
        shapes = tuple((n, tuple(t.shape), str(t.dtype), str(t.device))
                       for n, t in self.tensors.items())
        return shapes, repr(self.static)

    def specs(self) -> tuple[InputSpec, ...]:
        def role(name: str) -> str:
            return "latent" if name == self.latent else \
                "timestep" if name == self.timestep else "cond"
        return tuple(InputSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                               role(name), "timestep" if name == self.timestep else "randn")
                     for name, t in self.tensors.items())

    @property
    def cond(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.tensors.items() if n not in (self.latent, self.timestep)}

    def describe(self) -> str:
        return ", ".join(f"{n}{list(t.shape)}" for n, t in self.tensors.items())


def structure_change(first: tuple, static: dict, call: Call, k: int) -> str:
    """How ``call`` (a stream's call ``k``) differs in structure from the stream's first call
    (its :attr:`Call.key` ``first`` and its ``static`` part): the first input added, removed,
    or fed another shape, dtype or device, else the first non-tensor argument that changed.
    Values are not structure."""
    def form(shape, dtype, device, on: bool) -> str:
        return f"{list(shape)} {dtype.removeprefix('torch.')}" + (f" on {device}" if on else "")

    was = {n: rest for n, *rest in first[0]}
    now = {n: rest for n, *rest in call.key[0]}
    for name in dict.fromkeys([*was, *now]):
        a, b = was.get(name), now.get(name)
        if a is None or b is None:
            return (f"call {k} fed {name!r} {form(*b, False)}, its first call did not"
                    if a is None else
                    f"call {k} did not feed {name!r}, its first call {form(*a, False)}")
        if a != b:
            on = a[2] != b[2]
            return f"call {k} fed {name!r} {form(*b, on)}, its first call {form(*a, on)}"
    for name in dict.fromkeys([*static, *call.static]):
        a, b = (repr(c.get(name, "<none>"))[:60] for c in (static, call.static))
        if a != b:
            return f"call {k} passed {name}={b}, its first call {name}={a}"
    return f"call {k} differs from its first call"


def bind_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> Call:
    """Name every argument of ``forward(*args, **kwargs)`` and split tensors from the rest."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"denoiser call does not match its forward{signature}: {err}") from None
    params = list(signature.parameters.values())
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"denoiser call: extra positional arguments {len(value)}; the "
                                "drop-in names every input (pass them by keyword)")
        else:
            named[name] = value
    latent = params[0].name
    for name in (latent, TIMESTEP):
        if not isinstance(named.get(name), torch.Tensor):
            got = type(named.get(name)).__name__ if name in named else "nothing"
            raise TypeError(f"denoiser call: {name!r} must be a tensor, got {got}; the drop-in "
                            f"needs the latent (the forward's first parameter) and the "
                            f"timestep as tensors")
    tensors: dict[str, torch.Tensor] = {}
    static = {}
    for name, value in named.items():
        rest = _split(value, name, tensors)
        if rest is not _TENSOR:
            static[name] = rest
    return Call(tensors, static, latent, TIMESTEP)


def _split(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[name] = value
        return _TENSOR
    if isinstance(value, Mapping):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str) or "." in key:
                raise TypeError(f"denoiser input {name!r}: dict key {key!r}; the drop-in "
                                "needs string keys without dots")
            rest = _split(v, f"{name}.{key}", tensors)
            if rest is not _TENSOR:
                out[key] = rest
        return out
    if isinstance(value, (list, tuple)) and _has_tensor(value):
        items = []
        for i, v in enumerate(value):
            rest = _split(v, f"{name}.{i}", tensors)
            if rest is not _TENSOR:
                items.append((i, rest))
        return Seq(type(value), len(value), tuple(items))
    return value


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_tensor(v) for v in value.values())
    return False


def merge(static: Mapping, inputs: Mapping) -> dict:
    """``static`` with the nested ``inputs`` laid over it (dicts merged key by key, sequences
    rebuilt entry by entry)."""
    out = dict(static)
    for key, value in inputs.items():
        if isinstance(out.get(key), Seq):
            out[key] = out[key].rebuild(value)
        elif isinstance(out.get(key), Mapping):
            if isinstance(value, (tuple, list)):  # nest() made a tuple of keys "0" … "n-1"
                value = {str(i): v for i, v in enumerate(value)}
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def with_static(forward: Callable, static: Mapping, record: Callable[[Any], None]) -> Callable:
    """``forward`` taking only the (nested) tensor inputs, the static part baked in;
    ``record`` sees what the model returned (to answer in the same form)."""
    def call(**inputs):
        out = forward(**merge(static, inputs))
        record(out)
        return out
    return call


def output_form(out: Any) -> Any:
    """How the model answered: ``tuple``, ``torch.Tensor`` or its output dataclass type."""
    if isinstance(out, (tuple, list)):
        return tuple
    if isinstance(out, torch.Tensor):
        return torch.Tensor
    if dataclasses.is_dataclass(out):
        return type(out)
    raise TypeError(f"denoiser returned {type(out).__name__}; the drop-in expects a tensor, a "
                    "tuple or an output dataclass whose first field is the prediction")


def answer(eps: torch.Tensor, form: Any) -> Any:
    """ε in the form the model itself returns (``return_dict=False`` -> ``(ε,)``)."""
    if form is tuple:
        return (eps,)
    if form is torch.Tensor:
        return eps
    first = dataclasses.fields(form)[0].name
    return form(**{first: eps})


def half_call(call: Call, group: int) -> Call:
    """Half ``group`` (0: first, the unconditional one) of a call's batch, for CFG-parallel:
    every tensor whose dim 0 is the latent's batch is cut in two (the timestep too, when the
    pipeline passes one per sample); the rest is shared."""
    rows = call.tensors[call.latent].shape[0]
    if rows % 2:
        raise ValueError(f"cfg_parallel=True: the denoiser was called with a batch of {rows}; "
                         "allowed: an even batch, the guidance batch [uncond, cond] of a "
                         "pipeline that runs guidance as one call (guidance scale > 1)")
    return dataclasses.replace(call, tensors=half_of(call.tensors, rows, group))
