"""Capture: the exported graph equals eager bit-exactly for every zoo model; a capture failure
names the module and the source line; the trunk/conditioning split follows the data flow."""
from __future__ import annotations

import inspect

import networkx as nx
import pytest
import torch
from torch import nn

from partition import CaptureError, InputSpec, capture
from experiments import zoo
from partition.cost import node_module
from tiers import model_params

MODELS = model_params(zoo.model_names())


@pytest.mark.parametrize("name", MODELS)
def test_captured_graph_equals_eager(tiny, name):
    t = tiny(name)
    assert t.eager.shape == t.inputs[t.bundle.latent].shape
    assert t.eager.abs().max() > 0
    with torch.no_grad():
        assert torch.equal(t.captured(t.inputs), t.eager)
        # The graph is specialised on shapes, not on values: other inputs of the same shapes
        # still give eager's result exactly.
        other = t.bundle.inputs(1)
        got = t.captured(other)
        want = t.bundle(other)
    assert not torch.equal(want, t.eager)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_placeholders_follow_the_specs(tiny, name):
    t = tiny(name)
    names = [n.name for n in t.captured.gm.graph.nodes if n.op == "placeholder"]
    assert list(t.captured.placeholders) == [s.name for s in t.bundle.specs]
    assert list(t.captured.placeholders.values()) == names
    assert t.captured.latent == t.captured.placeholders[t.bundle.latent]
    assert list(t.env) == names
    # no export shape guard survives in the graph (it would land in a stage)
    assert not [n for n in t.captured.gm.graph.nodes
                if n.op == "call_module" and str(n.target).startswith("_guards")]


# --------------------------------------------------------------------------- failures


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: export cannot capture this
            return x * 2
        return x - 1


class HasBranchyInner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.inner = Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.conv(x))


def _line_of(func, needle: str) -> int:
    lines, first = inspect.getsourcelines(func)
    return first + next(i for i, line in enumerate(lines) if needle in line)


def test_capture_error_names_module_and_source_line():
    specs = (InputSpec("x", (1, 3, 4, 4), role="latent"),)
    with pytest.raises(CaptureError) as info:
        capture(HasBranchyInner(), specs, {"x": torch.randn(1, 3, 4, 4)})
    msg = str(info.value)
    line = _line_of(Branchy.forward, "if x.sum() > 0:")
    assert "'inner'" in msg
    assert f"{__file__}:{line}" in msg, msg
    assert "x.sum() > 0" in msg


def test_capture_rejects_missing_inputs_and_latents():
    specs = (InputSpec("x", (1, 3, 4, 4), role="latent"), InputSpec("c", (1, 3)))
    with pytest.raises(ValueError, match=r"missing example values for \['c'\]"):
        capture(nn.Identity(), specs, {"x": torch.zeros(1, 3, 4, 4)})
    with pytest.raises(ValueError, match="exactly one input must have role 'latent'"):
        capture(nn.Identity(), (InputSpec("x", (2,)),), {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="role='noise'.*allowed: latent, timestep, cond"):
        InputSpec("x", (2,), role="noise")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- trunk vs conditioning


def test_sd15_trunk_and_conditioning(sd15):
    g = sd15.graph
    nodes = {n.name: n for n in sd15.captured.gm.graph.nodes}
    trunk, cond = set(g.trunk), set(g.conditioning)
    assert not trunk & cond
    computed = {n.name for n in sd15.captured.gm.graph.nodes if n.op == "call_function"}
    assert trunk | cond == computed

    def module(name: str) -> str:
        return node_module(nodes[name])

    temb = [n for n in computed if module(n).startswith(("time_embedding", "time_proj"))]
    assert len(temb) >= 5  # sinusoid (arange, exp, sin, cos, cat …) and the two linears
    assert set(temb) <= cond
    assert any(module(n) == "time_embedding.linear_1" for n in temb)
    conv_in = [n for n in computed if module(n) == "conv_in"]
    assert conv_in and set(conv_in) <= trunk
    # Classification is by data flow, not by module: inside one cross-attention the keys and
    # values of the text are conditioning, its queries trunk; self-attention keys are trunk.
    to_k2 = [n for n in computed if module(n).endswith("attn2.to_k")]
    to_q2 = [n for n in computed if module(n).endswith("attn2.to_q")]
    to_k1 = [n for n in computed if module(n).endswith("attn1.to_k")]
    assert to_k2 and set(to_k2) <= cond
    assert to_q2 and set(to_q2) <= trunk
    assert to_k1 and set(to_k1) <= trunk
    # Trunk = exactly what the latent reaches.
    latent = sd15.captured.latent
    assert all(nx.has_path(g.nx, latent, n) for n in trunk)
    assert not any(nx.has_path(g.nx, latent, n) for n in cond)
    # Trunk positions are execution order.
    order = [n.name for n in sd15.captured.gm.graph.nodes if n.name in trunk]
    assert g.trunk == order
