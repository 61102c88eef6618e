"""Per-node costs against analytic ground truth.

Convention (partition/cost.py): FLOPs = 2 × MACs, bias and elementwise work not counted.
Every expected integer below is derived by hand from the shapes, not from the code.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from torch import nn

from partition import InputSpec, build_graph, capture, profile
from partition.cost import node_module


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(8, 4, kernel_size=2, stride=2, groups=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))             # [2, 8, 6, 6]
        h = self.grouped(h)                      # [2, 4, 3, 3]
        return self.fc(h.permute(0, 2, 3, 1))    # [2, 3, 3, 5]


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def _captured(module, specs):
    g = torch.Generator().manual_seed(0)
    inputs = {s.name: torch.randn(s.shape, generator=g) for s in specs}
    with torch.no_grad():
        return capture(module.eval(), specs, inputs), inputs


def _by_module(captured, per_node: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in captured.gm.graph.nodes:
        if n.name in per_node:
            m = node_module(n)
            out[m] = out.get(m, 0) + per_node[n.name]
    return out


CONV_SPECS = (InputSpec("x", (2, 3, 6, 6), role="latent"),)
# conv:    out [2, 8, 6, 6], each output a 3·3·3 = 27-term dot product:
#          2 · (2·8·6·6) · 27 = 31104
# grouped: out [2, 4, 3, 3], each output sees 8/2 = 4 input channels × 2·2 taps = 16 terms:
#          2 · (2·4·3·3) · 16 = 2304
# fc:      2·3·3 = 18 rows × 4 inputs × 5 outputs: 2 · 18 · 4 · 5 = 720
CONV_FLOPS = {"conv": 31104, "grouped": 2304, "fc": 720}


def test_conv_and_linear_flops_by_hand():
    m = ConvThenLinear()
    cap, x = _captured(m, CONV_SPECS)
    costs = profile(cap, x, repeats=0)
    nonzero = {k: v for k, v in _by_module(cap, costs.flops).items() if v}
    assert nonzero == CONV_FLOPS
    assert sum(costs.flops.values()) == sum(CONV_FLOPS.values())
    assert costs.uncounted == {}
    assert costs.ms == {} and costs.repeats == 0
    # output bytes are per node: the fc output is 2·3·3·5 float32
    fc_node = next(n.name for n in cap.gm.graph.nodes if node_module(n) == "fc"
                   and n.name in costs.out_bytes and tuple(n.meta["val"].shape) == (2, 3, 3, 5))
    assert costs.out_bytes[fc_node] == 2 * 3 * 3 * 5 * 4


@pytest.mark.parametrize("b, h, l, s, d, dv", [
    (2, 3, 5, 7, 4, 4),    # the CPU flash kernel (dispatches to the mapped CPU op)
    (2, 3, 5, 7, 4, 6),    # value head dim ≠ query head dim: the math fallback (bmm)
    (1, 2, 16, 16, 8, 8),
])
def test_sdpa_flops_by_hand(b, h, l, s, d, dv):
    # QKᵀ: B·H·L·S dot products of length d; softmax(·)V: B·H·L·dv of length S.
    expected = 2 * b * h * l * s * d + 2 * b * h * l * dv * s
    specs = (InputSpec("q", (b, h, l, d), role="latent"), InputSpec("k", (b, h, s, d)),
             InputSpec("v", (b, h, s, dv)))
    cap, x = _captured(Attention(), specs)
    costs = profile(cap, x, repeats=0)
    assert costs.flops == {"scaled_dot_product_attention": expected}
    # softmax is zero by convention: nothing here is an unknown operator
    assert costs.uncounted == {}


def test_sdpa_flops_literal():
    # (2, 3, 5, 7, 4, 4): 2·2·3·5·7·4 + 2·2·3·5·4·7 = 1680 + 1680
    specs = (InputSpec("q", (2, 3, 5, 4), role="latent"), InputSpec("k", (2, 3, 7, 4)),
             InputSpec("v", (2, 3, 7, 4)))
    cap, x = _captured(Attention(), specs)
    assert profile(cap, x, repeats=0).flops["scaled_dot_product_attention"] == 3360


def test_fvcore_path_matches_twice_fvcore_macs():
    m = ConvThenLinear()
    cap, x = _captured(m, CONV_SPECS)
    costs = profile(cap, x, repeats=0, fvcore_model=m)
    assert costs.fvcore_flops is not None
    assert set(costs.fvcore_flops) == set(costs.flops)
    fca = FlopCountAnalysis(m, (x["x"],))
    fca.unsupported_ops_warnings(False)
    macs = fca.by_module()
    got = _by_module(cap, costs.fvcore_flops)
    for mod in ("conv", "grouped", "fc"):
        assert got[mod] == 2 * macs[mod] == CONV_FLOPS[mod]
    assert sum(costs.fvcore_flops.values()) == 2 * fca.total()
    # the weights the partitioner balances under each cost model
    assert costs.weights("fvcore") == costs.fvcore_flops
    assert costs.weights("flops") == {k: float(v) for k, v in costs.flops.items()}


def test_fvcore_sdpa_handle():
    specs = (InputSpec("q", (2, 3, 5, 4), role="latent"), InputSpec("k", (2, 3, 7, 4)),
             InputSpec("v", (2, 3, 7, 6)))
    m = Attention()
    cap, x = _captured(m, specs)
    costs = profile(cap, x, repeats=0, fvcore_model=m)
    assert sum(costs.fvcore_flops.values()) == 2 * 2 * 3 * 5 * 7 * (4 + 6)


class Unusual(nn.Module):
    def forward(self, x):
        # cumprod and an FFT are neither matmul/conv/attention nor a known zero-cost op;
        # sort is zero by convention; add/mul are pointwise.
        spectrum = torch.fft.fft(x).real
        return torch.cumprod(x, -1) * 0.5 + spectrum + torch.sort(x, -1)[0]


def test_unknown_operators_are_reported():
    specs = (InputSpec("x", (2, 8), role="latent"),)
    cap, x = _captured(Unusual(), specs)
    costs = profile(cap, x, repeats=0)
    assert costs.uncounted == {"aten._fft_r2c": 1, "aten.cumprod": 1}
    assert sum(costs.flops.values()) == 0
    # and they travel into the plan
    from partition import PartitionRequest, compile_graph
    plan = compile_graph(build_graph(cap, costs, "flops"), PartitionRequest(n=1),
                         strategy="balanced", cost_model="flops", name="u", config_hash="").plan
    assert plan.uncounted_ops == (("aten._fft_r2c", 1), ("aten.cumprod", 1))


def test_time_costs_need_repeats():
    cap, x = _captured(ConvThenLinear(), CONV_SPECS)
    flops_only = profile(cap, x, repeats=0)
    with pytest.raises(ValueError, match="repeats >= 1"):
        flops_only.weights("time")
    with pytest.raises(ValueError, match="fvcore_model"):
        flops_only.weights("fvcore")
    with pytest.raises(ValueError, match="cost_model='joules'.*allowed: time, flops, fvcore"):
        flops_only.weights("joules")
    timed = profile(cap, x, repeats=2, threads=1)
    assert set(timed.ms) == set(timed.flops)
    assert all(v >= 0 for v in timed.ms.values()) and sum(timed.ms.values()) > 0
    assert (timed.repeats, timed.threads) == (2, 1)
    assert timed.flops == flops_only.flops


def test_sd15_flops_cover_the_graph(sd15):
    costs = sd15.costs
    computed = {n.name for n in sd15.captured.gm.graph.nodes if n.op == "call_function"}
    assert set(costs.flops) == computed
    assert costs.uncounted == {}
    # conv_in by hand: 4 -> 32 channels, 3x3, 16x16, batch 2: 2 · (2·32·16·16) · (4·9)
    conv_in = [n for n in sd15.graph.trunk if sd15.graph.modules[sd15.graph.pos[n]] == "conv_in"]
    assert sum(costs.flops[n] for n in conv_in) == 2 * 2 * 32 * 16 * 16 * 4 * 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_time_profile_on_the_gpu_times_a_moved_copy():
    """``profile(device='cuda')``: every counted node timed on the GPU (CUDA events), the
    captured graph itself left on the CPU, and the plan says where it was timed."""
    from partition import PartitionRequest, compile_graph
    from experiments import zoo
    bundle = zoo.build(zoo.load_yaml("sd15"))
    inputs = bundle.inputs(0)
    with torch.no_grad():
        captured = capture(bundle.module, bundle.specs, inputs, bundle.contract)
        costs = profile(captured, inputs, repeats=2, device="cuda")
    assert costs.device.startswith("cuda") and set(costs.ms) == set(costs.flops)
    assert all(v >= 0 for v in costs.ms.values()) and sum(costs.ms.values()) > 0
    assert all(p.device.type == "cpu" for p in captured.gm.parameters())
    plan = compile_graph(build_graph(captured, costs, "time"), PartitionRequest(n=2),
                         strategy="balanced", cost_model="time", name="sd15/tiny",
                         config_hash="").plan
    assert plan.measured.device.startswith("cuda") and len(plan.measured.stage_ms) == 2


def test_time_profile_on_a_named_cpu_is_the_default():
    specs = (InputSpec("x", (2, 3, 6, 6), role="latent"),)
    captured, inputs = _captured(ConvThenLinear(), specs)
    costs = profile(captured, inputs, repeats=1, device="cpu")
    assert costs.device == "cpu" and set(costs.ms) == set(costs.flops)


def test_own_times_add_up_to_the_forward_through_uncalled_containers():
    """A ModuleList is never called, so it has no time of its own: the blocks inside it count
    as inside the nearest module that was called, and the own times add up to the forward's
    time instead of counting every block twice."""
    from partition.timing import own_times

    inclusive = {"": 10.0, "conv_in": 1.0, "down_blocks.0": 4.0, "down_blocks.1": 3.0,
                 "down_blocks.0.resnets.0": 2.5, "down_blocks.0.resnets.1": 1.0}
    own = own_times(inclusive)
    assert own == {"": 2.0, "conv_in": 1.0, "down_blocks.0": 0.5, "down_blocks.1": 3.0,
                   "down_blocks.0.resnets.0": 2.5, "down_blocks.0.resnets.1": 1.0}
    assert sum(own.values()) == inclusive[""]
