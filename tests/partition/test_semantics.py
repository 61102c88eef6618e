"""Any denoiser, never silently wrong: each class of network that once split wrongly, crashed
the cost pass or could not be captured (hand-written cases in ``denoisers.py``)."""
from __future__ import annotations

import pytest
import torch

from partition import PartitionRequest, compile_model
from partition.capture import capture, mutating_nodes
from partition.verify import same
import denoisers as D  # noqa: N812 (tests/denoisers.py, on the path by tests/conftest.py)


def eager(model, inputs, specs, contract=None):
    from partition.spec import call_denoiser
    with torch.no_grad():
        return call_denoiser(model.eval(), inputs, contract, specs)


def chained(compiled, inputs):
    with torch.no_grad():
        return compiled.staged.run(compiled.graph.captured.env(inputs))


# --------------------------------------------------------------------------- 1: side effects


@pytest.mark.slow
@pytest.mark.parametrize("cls", [D.RotaryGrid, D.FillAndIndexPut, D.InPlaceAlias])
def test_in_place_writes_survive_staging(cls):
    torch.manual_seed(0)
    model, specs = cls().eval(), D.seq_specs()
    inputs = D.example(specs)
    want = eager(model, inputs, specs)
    cap = capture(model, specs, inputs)
    assert cap.functionalized and not mutating_nodes(cap.gm.graph)
    for n in (1, 2, 3, 4):
        c = compile_model(model, specs, inputs, PartitionRequest(n=n, depth=None))
        assert c.plan.verification.startswith("exact: stages == eager"), c.plan.verification
        assert same(chained(c, inputs), want), n
        # the verification holds for other inputs too, not just the example it ran on
        other = D.example(specs, seed=5)
        assert same(chained(c, other), eager(model, other, specs)), n


def test_functionalizing_a_capture_says_nothing_of_torchs_internals():
    """``run_decompositions`` copies its own module call graph, whose pytree leaves torch
    2.13 warns about (a FutureWarning meant for code that tests ``isinstance(…, LeafSpec)``;
    none of ours does): filtered where it arises, every other warning still shows."""
    import warnings

    model, specs = D.InPlaceAlias().eval(), D.seq_specs()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cap = capture(model, specs, D.example(specs))
    assert cap.functionalized
    assert not [str(w.message) for w in seen if "LeafSpec" in str(w.message)]


def test_a_dropped_write_is_refused_loudly(monkeypatch):
    """The verification catches a staging that loses a write: here functionalization is
    switched off on purpose, as the compiler was before it had it."""
    import sys
    monkeypatch.setattr(sys.modules["partition.capture"], "mutating_nodes", lambda graph: [])
    model, specs = D.RotaryGrid().eval(), D.seq_specs()
    inputs = D.example(specs)
    from partition.verify import VerificationError
    # the first value that differs is the first read of the table (``h * grid``)
    with pytest.raises(VerificationError, match=r"first diverging value is node 'mul_1' "
                                                r"\(aten.mul.Tensor\) of stage 0, in module "
                                                r"'<root>', off by"):
        compile_model(model, specs, inputs, PartitionRequest(n=2, depth=None), backend="graph")


def test_a_known_kernel_path_difference_is_stated_with_its_size(caplog):
    torch.manual_seed(0)
    model, specs = D.FastPathAttention().eval(), D.seq_specs()
    inputs = D.example(specs)
    fast = eager(model, inputs, specs)
    c = compile_model(model, specs, inputs, PartitionRequest(n=2, depth=None))
    note = c.plan.verification
    assert note.startswith("exact: stages == captured == eager with autograd enabled")
    d = float(note.split("differs by ")[1].split(" ")[0])
    assert d == pytest.approx(float((chained(c, inputs) - fast).abs().max()), rel=1e-2)
    assert 0 < d < 1e-4
    assert "nn.MultiheadAttention's fast path" in note
    assert any("fused kernel path" in r.getMessage() for r in caplog.records)


def test_tables_a_model_fills_lazily_are_left_as_they_were():
    """Tracing first would leave traced values in a helper object's table and in a method's
    lru_cache: every later eager call (the verification's) would fail."""
    torch.manual_seed(0)
    model, specs = D.LazyTables().eval(), D.seq_specs()
    inputs = D.example(specs)
    c = compile_model(model, specs, inputs, PartitionRequest(n=2, depth=None))
    assert c.plan.verification.startswith("exact")
    assert same(chained(c, inputs), eager(model, inputs, specs))


def test_a_clean_graph_is_not_re_traced(sd15):
    assert not sd15.captured.functionalized


# --------------------------------------------------------------------------- 2: cost pass


@pytest.mark.parametrize("cost_model", ["flops", "time", "fvcore"])
def test_data_dependent_shapes_are_costed_on_real_values(cost_model):
    torch.manual_seed(0)
    model, specs = D.NonzeroAttention().eval(), D.NONZERO_SPECS
    inputs = D.example(specs)
    want = eager(model, inputs, specs)
    for n in (2, 3):
        c = compile_model(model, specs, inputs, PartitionRequest(n=n, depth=None),
                          cost_model=cost_model, repeats=1)
        assert c.graph.costs.counted_on == "real"
        assert sum(c.graph.costs.flops.values()) > 0
        assert same(chained(c, inputs), want)
        assert c.plan.verification.startswith("exact")


def test_a_failing_node_is_named():
    from partition.cost import CostError, profile

    class Bad(torch.nn.Module):
        """Fake tensors cannot run ``nonzero``; the real values then fail an assertion."""

        def forward(self, sample, timestep, mask):
            h = sample.index_select(1, mask.nonzero()[:, 0])
            torch._assert_async(h.abs().sum() > 1e9)
            return h

    specs = D.NONZERO_SPECS[:2] + D.NONZERO_SPECS[3:]
    inputs = D.example(specs)
    cap = capture(Bad(), specs, inputs)
    with pytest.raises(CostError, match=r"cost pass failed at node '_assert_async' "
                                        r"\(aten._assert_async.default\) in module '<root>'"):
        profile(cap, inputs, repeats=0)


# --------------------------------------------------------------------------- 4: conditioning


def stage_step_flops(compiled) -> list[int]:
    """What each stage really runs per step, counted from its own segment graphs."""
    flops = compiled.graph.costs.flops
    return [sum(flops.get(n.name, 0) for seg in compiled.staged.stage_segments(s)
                for n in seg.gm.graph.nodes if n.op == "call_function")
            for s in range(compiled.plan.n)]


def test_a_heavy_hint_encoder_runs_once_per_run_and_the_balance_sees_it():
    torch.manual_seed(0)
    model, specs = D.HintUNet().eval(), D.HINT_SPECS
    inputs = D.example(specs)
    want = eager(model, inputs, specs)
    for n in (2, 3, 4):
        c = compile_model(model, specs, inputs, PartitionRequest(n=n, depth=None))
        assert same(chained(c, inputs), want)
        hoisted_modules = {h.module for h in c.plan.hoisted}
        assert any(m.startswith("hint.") for m in hoisted_modules), hoisted_modules
        # no stage runs the hint encoder per step
        per_step = {node.name for seg in c.staged.segments for node in seg.gm.graph.nodes
                    if node.op == "call_function"}
        assert not per_step & set(c.graph.cond.hoisted)
        real = stage_step_flops(c)
        assert [st.flops for st in c.plan.stages] == real
        assert c.plan.flops_imbalance == pytest.approx(max(real) / (sum(real) / n), rel=1e-6)
        assert c.plan.imbalance == c.plan.flops_imbalance  # cost model flops: the same measure
        assert c.plan.imbalance < 1.25, (n, real)
        # the time embedding every block reads is per-step conditioning, in every stage
        assert all(st.cond_flops > 0 for st in c.plan.stages)


def test_a_heavy_caption_projection_is_computed_on_one_stage_and_sent_once():
    torch.manual_seed(0)
    model, specs = D.CaptionDiT().eval(), D.CAPTION_SPECS
    inputs = D.example(specs)
    total = sum(p.numel() for p in model.parameters())
    c = compile_model(model, specs, inputs, PartitionRequest(n=4, depth=None))
    assert same(chained(c, inputs), eager(model, inputs, specs))
    held = sum(st.params + st.replicated_params for st in c.plan.stages)
    caption = sum(p.numel() for p in model.caption.parameters())
    assert caption > total / 2  # the projection dominates the model
    assert held <= total + 4 * (total - caption)  # only the small parts may be replicated
    sent = [h for h in c.plan.hoisted if h.home >= 0]
    assert sent and all(h.module.startswith("caption") for h in sent)
    assert c.plan.hoisted_bytes_per_run == sum(h.bytes * (len(h.consumers) - 1) for h in sent)


# --------------------------------------------------------------------------- 5: the contract


ROTARY_CONTRACT = {"timestep_scale": 0.001, "static": {"num_frames": 3, "fps": 7.5},
                   "output": {"index": 0}, "narrow": {"dim": 2, "length": 8}}


def test_the_call_contract_replaces_a_wrapper():
    from partition.contract import DenoiserContract
    torch.manual_seed(0)
    model, specs = D.RotaryTuple().eval(), D.ROTARY_SPECS
    contract = DenoiserContract.from_config(ROTARY_CONTRACT)
    inputs = D.example(specs)
    with torch.no_grad():  # what a hand-written wrapper did
        by_hand = model(inputs["hidden_states"], inputs["timestep"] * 0.001, inputs["context"],
                        (inputs["image_rotary_emb.0"], inputs["image_rotary_emb.1"]),
                        inputs["residual"], num_frames=3, fps=7.5, return_dict=False)[0][..., :8]
    assert same(eager(model, inputs, specs, contract), by_hand)
    paths = {p for p, _ in model.named_modules()}
    for n in (1, 2, 3):
        c = compile_model(model, specs, inputs, PartitionRequest(n=n, depth=1),
                          contract=contract)
        assert same(chained(c, inputs), by_hand)
        assert c.plan.verification.startswith("exact")
        modules = {m for st in c.plan.stages for sg in st.segments
                   for m in (sg.first_module, sg.last_module)}
        assert modules - {""} <= paths, modules - paths  # the user's own paths, no prefix
    manual = compile_model(model, specs, inputs, PartitionRequest(
        n=2, options={"boundaries": ["blocks.3"]}), strategy="manual", contract=contract)
    assert manual.plan.stages[1].segments[0].first_module.startswith("blocks.3")
    # the residual is a per-step input: what reads it is trunk, never hoisted
    assert not any("residual" in h.name for h in manual.plan.hoisted)


def test_contract_affine_timestep_negation_and_output_paths():
    from partition.contract import DenoiserContract
    c = DenoiserContract.from_config({"timestep_scale": -0.001, "timestep_offset": 1,
                                      "output": {"index": [1, 0], "negate": True},
                                      "narrow": {"dim": 0, "length": 2, "start": -2}})
    assert DenoiserContract.from_config(c.to_config()) == c
    seen = {}

    class Net(torch.nn.Module):
        def forward(self, x, t):
            seen["t"] = t
            return x, [x * 2 + t]

    x = torch.arange(4.0)
    out = c.call(Net(), {"x": x, "t": torch.tensor(250.0)}, "x", "t")
    assert float(seen["t"]) == 0.75  # 1 - 250/1000
    assert torch.equal(out, -(x * 2 + 0.75)[2:])


def test_an_output_of_another_shape_and_dtype():
    torch.manual_seed(0)
    model, specs = D.TokenLogits().eval(), D.seq_specs()
    inputs = D.example(specs)
    c = compile_model(model, specs, inputs, PartitionRequest(n=3, depth=None))
    assert c.plan.output_shape == (2, D.L, 11) and c.plan.output_dtype == "float16"
    assert same(chained(c, inputs), eager(model, inputs, specs))


@pytest.mark.slow
def test_compile_model_defaults_are_deterministic_and_do_no_timing(sd15):
    c = compile_model(sd15.bundle.module, sd15.bundle.specs, sd15.inputs, PartitionRequest(n=2),
                      captured=sd15.captured)
    assert c.plan.cost_model == "flops" and c.graph.costs.repeats == 0
    assert c.plan.measured is None and c.graph.costs.ms == {}
    again = compile_model(sd15.bundle.module, sd15.bundle.specs, sd15.inputs,
                          PartitionRequest(n=2), captured=sd15.captured)
    assert again.plan.to_json() == c.plan.to_json()


def test_contract_errors_name_the_key():
    from partition.contract import ContractError, DenoiserContract
    with pytest.raises(ContractError, match=r"model.contract: unknown key\(s\) \['outputs'\]; "
                                            r"allowed: timestep_scale, timestep_offset, static, concat, "
                                            r"output, narrow"):
        DenoiserContract.from_config({"outputs": {"index": 1}})
    model, specs = D.RotaryTuple().eval(), D.ROTARY_SPECS
    inputs = D.example(specs)
    bad = DenoiserContract.from_config({**ROTARY_CONTRACT, "output": {"field": "eps"}})
    with pytest.raises(ContractError, match=r"contract.output.field='eps': the network "
                                            r"returned tuple"):
        compile_model(model, specs, inputs, PartitionRequest(n=2), contract=bad)
