"""The paper's own splits (partition/paper_splits/*.yaml) as manual plans on the tiny models:
they validate, chain exactly, and reproduce the paper's assignment of cross-stage values
(docs/design.md §2 invariant 4)."""
from __future__ import annotations

import pytest
import torch

import experiments.plan
from partition import PartitionRequest, Plan, splits

PAPER = splits.names()


def load_split(stem: str) -> tuple[str, PartitionRequest]:
    """paper_sd21_n2 -> ("sd21", PartitionRequest(n=2, options={"boundaries": [...]}))."""
    s = splits.named(stem)
    assert s.strategy == "manual" and len(s.options) == 1
    return s.model, s.request()


def test_every_paper_split_is_here():
    assert PAPER == [f"paper_{m}_n{n}" for m in ("sd15", "sd21", "sdxl") for n in (2, 3, 4)]


# --------------------------------------------------------------------------- sd21, N = 2


def skip_producers(unet) -> list[str]:
    """Module paths producing the UNet's skip tensors, in the order the down path pushes them
    (diffusers UNet2DConditionModel.forward: ``down_block_res_samples``)."""
    out = ["conv_in"]
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            out.append(f"down_blocks.{i}.attentions.{j}" if attentions is not None
                       else f"down_blocks.{i}.resnets.{j}")
        if block.downsamplers is not None:
            out.append(f"down_blocks.{i}.downsamplers.0")
    return out


def skips_consumed(unet) -> dict[int, list[str]]:
    """Up block index -> producers of the skips it pops (each up block pops as many as it
    has resnets, from the end)."""
    stack = skip_producers(unet)
    out = {}
    for k, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        out[k], stack = stack[-n:], stack[:-n]
    assert not stack
    return out


# Written by hand from the paper's figure / the official code's SD 2.1 N=2 split: stage 2
# starts at up_blocks.1.attentions.2, so it reads the main path from up_blocks.1.resnets.2
# and every skip of up_blocks.2 and up_blocks.3.
SD21_N2_VALUES = [
    "up_blocks.1.resnets.2",
    "down_blocks.1.attentions.1", "down_blocks.1.attentions.0", "down_blocks.0.downsamplers.0",
    "down_blocks.0.attentions.1", "down_blocks.0.attentions.0", "conv_in",
]


def test_sd21_n2_skip_structure_matches_the_hand_derived_list(sd21):
    consumed = skips_consumed(sd21.bundle.module)
    assert consumed[3] + consumed[2] == SD21_N2_VALUES[1:][::-1]
    assert set(consumed[2]) == {"down_blocks.1.attentions.1", "down_blocks.1.attentions.0",
                                "down_blocks.0.downsamplers.0"}
    assert set(consumed[3]) == {"down_blocks.0.attentions.1", "down_blocks.0.attentions.0",
                                "conv_in"}
    # up_blocks.1.resnets.2 itself pops down_blocks.1.downsamplers.0: stage 1's own business
    assert consumed[1][0] == "down_blocks.1.downsamplers.0"


def _within(module: str, path: str) -> bool:
    return module == path or module.startswith(path + ".")


def test_sd21_n2_reproduces_the_papers_values(sd21):
    name, request = load_split("paper_sd21_n2")
    assert name == "sd21" and request.options == {"boundaries": ["up_blocks.1.attentions.2"]}
    compiled = sd21.compile(request, "manual")
    plan = compiled.plan
    assert torch.equal(sd21.run(compiled.staged), sd21.eager)
    assert [len(st.segments) for st in plan.stages] == [1, 1]
    assert plan.stages[1].segments[0].first_module.startswith("up_blocks.1.attentions.2")
    assert plan.stages[0].segments[0].last_module == "up_blocks.1.resnets.2"
    # one-to-one: every expected producer is exactly one value, and nothing else crosses
    matched = {p: [v for v in plan.values if _within(v.module, p)] for p in SD21_N2_VALUES}
    assert all(len(vs) == 1 for vs in matched.values()), {p: len(v) for p, v in matched.items()}
    assert len(plan.values) == len(SD21_N2_VALUES)
    assert all((v.producer, v.consumers) == (0, (1,)) for v in plan.values)
    main = matched["up_blocks.1.resnets.2"][0]
    g = sd21.graph
    last_of_resnet = max(i for i, m in enumerate(g.modules) if _within(m, "up_blocks.1.resnets.2"))
    assert main.name == g.trunk[last_of_resnet]
    assert main.shape == (2, 64, 4, 4)
    shapes = {p: vs[0].shape for p, vs in matched.items()}
    assert shapes["conv_in"] == (2, 32, 16, 16)
    assert shapes["down_blocks.0.downsamplers.0"] == (2, 32, 8, 8)
    assert shapes["down_blocks.1.attentions.1"] == (2, 64, 8, 8)
    assert plan.bytes_per_step == sum(v.bytes for v in plan.values) + plan.output_bytes


# --------------------------------------------------------------------------- every split

SHELL = ("conv_in", "down_blocks.0", "up_blocks.2", "conv_out")


@pytest.mark.parametrize("stem", PAPER)
def test_paper_split_plans_and_chains(tiny, stem):
    name, request = load_split(stem)
    t = tiny(name)
    compiled = t.compile(request, "manual")
    plan = compiled.plan
    assert plan.n == request.n and plan.strategy == "manual"
    assert all(st.nodes > 0 for st in plan.stages)
    assert torch.equal(t.run(compiled.staged), t.eager)
    assert Plan.from_json(plan.to_json()) == plan
    g, stage_of = t.graph, plan.stage_of()
    if "boundaries" in request.options:  # contiguous: stage j starts at boundary j-1
        assert all(len(st.segments) == 1 for st in plan.stages)
        assert list(stage_of) == sorted(stage_of)
        for st, path in zip(plan.stages[1:], request.options["boundaries"]):
            assert _within(st.segments[0].first_module, path), (st.segments[0].first_module, path)
            assert not any(_within(g.modules[i], path) for i in range(st.segments[0].start))
    else:  # SDXL: the high-resolution shell is the last stage, in two pieces
        last = plan.stages[-1]
        assert len(last.segments) == 2
        assert last.segments[0].start == 0 and last.segments[1].stop == g.size
        assert all(len(st.segments) == 1 for st in plan.stages[:-1])
        for i, m in enumerate(g.modules):
            if any(_within(m, p) for p in SHELL):
                assert stage_of[i] == plan.n - 1, m
        # every listed module lands on its stage
        for s, paths in enumerate(request.options["stages"]):
            for p in paths:
                hits = [i for i, m in enumerate(g.modules) if _within(m, p)]
                assert hits and all(stage_of[i] == s for i in hits), p


def test_paper_split_through_the_entry_point(sd21, compose_cfg, reuse_capture, tmp_path):
    reuse_capture("sd21")
    cfg = compose_cfg("model=sd21", "partition=paper_sd21_n2")
    assert cfg.parallel.n == 2 and list(cfg.partition.boundaries) == ["up_blocks.1.attentions.2"]
    compiled = experiments.plan.plan_from_config(cfg, tmp_path)
    _, request = load_split("paper_sd21_n2")
    direct = sd21.compile(request, "manual").plan
    assert compiled.plan.to_json(measured=False) == direct.to_json(measured=False)
    assert Plan.from_json((tmp_path / "plan.json").read_text()) == compiled.plan
