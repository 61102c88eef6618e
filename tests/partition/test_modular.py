"""The module backend: networks torch.export cannot capture still run, exactly."""
from __future__ import annotations

import denoisers as D  # noqa: N812 (tests/denoisers.py, on the path by tests/conftest.py)
import pytest
import torch

from partition import CaptureError, InputSpec, PartitionRequest, compile_model, format_plan
from partition.capture import capture
from partition.spec import call_denoiser
from partition.verify import VerificationError, same

LENGTHS = D.seq_specs() + (InputSpec("lengths", (2,), dtype="int64", init="randint:7"),)
UNCAPTURABLE = [(D.SetOfLengths, LENGTHS), (D.NumpyRouting, D.seq_specs()),
                (D.DataDependentBranch, D.NONZERO_SPECS)]


def eager(model, inputs, specs):
    with torch.no_grad():
        return call_denoiser(model, inputs, None, specs)


def chained(c, inputs):
    with torch.no_grad():
        return c.staged.run({s.name: inputs[s.name] for s in c.plan.inputs})


@pytest.mark.parametrize("cls, specs", UNCAPTURABLE, ids=lambda x: getattr(x, "__name__", ""))
def test_uncapturable_models_fall_back_to_the_module_backend(cls, specs):
    torch.manual_seed(0)
    model = cls().eval()
    inputs = D.example(specs)
    with pytest.raises(CaptureError, match=r"backend='module'"):  # the advice it gives
        capture(model, specs, inputs)
    want = eager(model, inputs, specs)
    for n in (1, 2, 3, 4):
        c = compile_model(model, specs, inputs, PartitionRequest(n=n))
        assert c.plan.backend == "module"
        assert any("torch.export could not capture" in x for x in c.plan.notes)
        assert c.plan.verification.startswith("exact: stages == eager")
        assert same(chained(c, inputs), want), n
        other = D.example(specs, seed=3)
        assert same(chained(c, other), eager(model, other, specs)), n
    table = format_plan(c.plan)
    assert "backend=module" in table and "runs on every device" in table


def test_graph_only_request_keeps_the_capture_error():
    model, specs = D.NumpyRouting().eval(), D.seq_specs()
    with pytest.raises(CaptureError, match="could not capture module '<root>'"):
        compile_model(model, specs, D.example(specs), PartitionRequest(n=2), backend="graph")


def test_blocks_are_the_networks_own_and_balanced():
    torch.manual_seed(0)
    model, specs = D.SeqDenoiser(depth=8).eval(), D.seq_specs()
    inputs = D.example(specs)
    c = compile_model(model, specs, inputs, PartitionRequest(n=4), backend="module")
    g = c.graph
    paths = {p for p, _ in model.named_modules()}
    assert set(g.modules) <= paths
    # conditioning modules are glue (their output does not depend on the latent)
    assert not {"time", "ctx", "time.lin"} & set(g.modules)
    assert [st.segments[0].first_module for st in c.plan.stages][0] == "inp"
    assert c.plan.imbalance < 1.3
    # a block's outputs go to every later stage
    for v in c.plan.values:
        assert v.consumers == tuple(range(v.producer + 1, 4))


def test_manual_boundaries_and_unknown_strategies():
    model, specs = D.SeqDenoiser().eval(), D.seq_specs()
    inputs = D.example(specs)
    c = compile_model(model, specs, inputs, PartitionRequest(
        n=2, options={"boundaries": ["blocks.4"]}), strategy="manual", backend="module")
    assert c.plan.stages[1].segments[0].first_module == "blocks.4"
    with pytest.raises(ValueError, match=r"strategy='shell_core': not available with the "
                                         r"module backend; allowed: balanced, equal_blocks, "
                                         r"manual"):
        compile_model(model, specs, inputs, PartitionRequest(n=2), strategy="shell_core",
                      backend="module")
    with pytest.raises(ValueError, match=r"boundaries: 'blocks.9' is not a block"):
        compile_model(model, specs, inputs, PartitionRequest(
            n=2, options={"boundaries": ["blocks.9"]}), strategy="manual", backend="module")


def test_a_block_that_keeps_state_is_refused():
    """A block whose output is not a function of its inputs cannot be answered by its
    owner's value: the verification says so instead of running it wrongly."""

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, h):
            self.calls += 1
            return h * self.calls

    class Stateful(D.SeqDenoiser):
        def __init__(self):
            super().__init__()
            self.count = Counter()

        def forward(self, sample, timestep, context):
            h = self.count(self.inp(sample))
            temb, ctx = self.time(timestep), self.ctx(context)
            for b in self.blocks:
                h = b(h, temb, ctx)
            return self.out(h)

    model, specs = Stateful().eval(), D.seq_specs()
    with pytest.raises(VerificationError, match="module backend's stages differ"):
        compile_model(model, specs, D.example(specs), PartitionRequest(n=2),
                      backend="module")


@pytest.mark.parametrize("n", [2, 3])
def test_a_block_called_at_two_positions_runs_exactly(n):
    """Weight sharing: ``model.res_b`` runs inside ``model.wrap`` and again on its own. A
    stage that answers ``wrap`` by its owner's value still counts the call made inside it,
    so the block's second call is told from its first (else a stage misses its last block
    and runs into the next stage's). Every stage that runs the shared block holds its
    weights; a stage that runs neither call holds none of them."""
    torch.manual_seed(0)
    model, specs = D.SharedBlock().eval(), D.seq_specs()
    inputs = D.example(specs)
    bounds = {2: ["model.blocks.1"], 3: ["model.blocks.1", "model.blocks.2"]}[n]
    c = compile_model(model, specs, inputs, PartitionRequest(n=n, options={"boundaries": bounds}),
                      strategy="manual", backend="module")
    assert "model.wrap#0" in c.plan.blocks and "model.res_b#1" in c.plan.blocks
    assert c.plan.verification.startswith("exact: stages == eager")
    other = D.example(specs, seed=3)
    assert same(chained(c, other), eager(model, other, specs))
    shared = {id(p) for p in model.model.res_b.parameters()}
    held = [shared <= {id(t) for t in seg.tensors()} for seg in c.staged.segments]
    assert held == [True, True] if n == 2 else held == [True, True, False]
    auto = compile_model(model, specs, inputs, PartitionRequest(n=n), backend="module")
    assert same(chained(auto, other), eager(model, other, specs))


def test_a_forward_that_leaves_its_traced_calls_is_refused_in_one_line():
    """A forward that calls its blocks otherwise than the trace saw (a data-dependent path)
    is named, by the stage and the block, instead of running into another stage's blocks or
    publishing a value it never made."""
    torch.manual_seed(0)
    model, specs = D.SharedBlock().eval(), D.seq_specs()
    inputs = D.example(specs)
    c = compile_model(model, specs, inputs, PartitionRequest(
        n=3, options={"boundaries": ["model.blocks.1", "model.blocks.2"]}), strategy="manual",
        backend="module")
    skips = (model.model, lambda h, temb, ctx: model.model.blocks[3](h, temb, ctx),
             r"called block 'model.blocks.3#0' \(stage 2's\), whose value is not among")
    ends = (model, lambda sample, timestep, context: model.inp(sample),
            r"ended without calling block 'model.blocks.0#0' \(this stage's\)")
    for module, forward, message in (skips, ends):
        module.forward = forward
        try:
            with pytest.raises(RuntimeError, match=r"^module backend, stage 0: the forward "
                                                   + message):
                chained(c, inputs)
        finally:
            del module.forward
