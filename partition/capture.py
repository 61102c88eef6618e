"""Capture a denoiser as a flat ``torch.fx.GraphModule`` with ``torch.export`` (non-strict).

``torch.fx.symbolic_trace`` fails on every diffusers model (their ``forward`` iterates over
shapes and calls ``len``/``int`` on them); non-strict export specialises on the example shapes
and is bit-exact with eager. One capture per input shape (batch, resolution, frames).
"""
from __future__ import annotations

import hashlib
import os
import traceback
from dataclasses import dataclass

import torch
from torch import fx, nn

from partition.spec import InputSpec, call_denoiser, latent_name


class CaptureError(RuntimeError):
    """Raised when ``torch.export`` cannot capture a model; names the module and source line."""


class PositionalDenoiser(nn.Module):
    """``forward(*tensors)`` -> noise prediction, so no dicts or dataclasses reach the tracer."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return call_denoiser(self.model, dict(zip(self.names, args)))


@dataclass
class Captured:
    """A captured denoiser: the graph plus which placeholder is which input."""

    gm: fx.GraphModule
    specs: tuple[InputSpec, ...]
    placeholders: dict[str, str]  # input name -> placeholder node name

    @property
    def latent(self) -> str:
        """Placeholder node name of the latent input."""
        return self.placeholders[latent_name(self.specs)]

    def env(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs keyed by spec name -> keyed by placeholder node name."""
        return {self.placeholders[s.name]: inputs[s.name] for s in self.specs}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.gm(*(inputs[s.name] for s in self.specs))

    def graph_hash(self) -> str:
        """Structure of the graph (ops, wiring, shapes): equal captures hash equal."""
        h = hashlib.sha256()
        for n in self.gm.graph.nodes:
            val = n.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
            h.update(f"{n.op}|{n.name}|{n.target}|{n.args}|{n.kwargs}|{shape}\n".encode())
        return h.hexdigest()[:16]


def capture(model: nn.Module, specs: tuple[InputSpec, ...] | list[InputSpec],
            inputs: dict[str, torch.Tensor]) -> Captured:
    """Export ``model`` called on ``inputs`` (keyed by ``specs`` names) to a GraphModule."""
    specs = tuple(specs)
    latent_name(specs)  # validates exactly one latent
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise ValueError(f"inputs: missing example values for {missing}")
    wrapper = PositionalDenoiser(model, tuple(s.name for s in specs)).eval()
    args = tuple(inputs[s.name] for s in specs)
    stack: list[str] = []
    hooks = _track_module_stack(wrapper, stack)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, args, strict=False)
    except Exception as err:  # re-raised with the failing module and source line
        raise CaptureError(_describe_failure(err, stack)) from err
    finally:
        for h in hooks:
            h.remove()
    gm = ep.module()
    _drop_guards(gm)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(specs):
        raise CaptureError(f"captured graph has {len(placeholders)} inputs, expected {len(specs)}")
    return Captured(gm=gm, specs=specs, placeholders=dict(zip((s.name for s in specs), placeholders)))


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove export's input-shape guard call: it has no users and must not land in a stage."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards") and not n.users:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()


def _track_module_stack(root: nn.Module, stack: list[str]) -> list:
    hooks = []
    for path, mod in root.named_modules():
        def pre(_m, _a, path=path):
            stack.append(path)

        def post(_m, _a, _o, path=path):
            if stack and stack[-1] == path:
                stack.pop()
        hooks.append(mod.register_forward_pre_hook(pre))
        hooks.append(mod.register_forward_hook(post))
    return hooks


def _describe_failure(err: Exception, stack: list[str]) -> str:
    module = stack[-1].removeprefix("model.") if stack else "<top level>"
    # The user's frames: not torch's, not this package's, not generated code. Compare whole
    # directories: a substring test ("/partition/") also drops a user's tests/partition/.
    internal = (os.path.dirname(torch.__file__) + os.sep,
                os.path.dirname(os.path.abspath(__file__)) + os.sep)
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not os.path.abspath(f.filename).startswith(internal)
              and not f.filename.startswith("<")]
    where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else "unknown"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"torch.export could not capture module '{module or '<root>'}' at {where}: "
            f"{type(err).__name__}: {first}. Make that code traceable, or give a manual split "
            f"(partition strategy 'manual', docs/partitioning.md) that cuts at module boundaries "
            f"the capture can reach.")


def move_graph(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """Move ``gm`` to ``device`` in place: parameters and buffers, and the ``device=``
    arguments export baked into the graph (``arange(..., device=cpu)`` and friends;
    research/feasibility.md §5.5)."""
    device = torch.device(device)
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": device}
    gm.recompile()
    return gm.to(device)
