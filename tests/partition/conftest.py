"""Shared fixtures for the compiler's tests: every tiny zoo model built, captured and costed
once per session (flops cost model), one intra-op thread throughout (oneDNN results depend on
the thread count, and every equality here is bit-exact)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
from dataclasses import dataclass

import pytest
import torch

from partition import (Captured, NodeCosts, PartitionRequest, TrunkGraph, build_graph,
                       capture, compile_graph, profile)
from experiments import zoo

torch.set_num_threads(1)


@dataclass
class Tiny:
    """A tiny zoo model with its example inputs, capture, FLOP costs, trunk graph and eager ε."""

    name: str
    bundle: zoo.ModelBundle
    inputs: dict[str, torch.Tensor]
    captured: Captured
    costs: NodeCosts
    graph: TrunkGraph
    eager: torch.Tensor

    @property
    def env(self) -> dict[str, torch.Tensor]:
        return self.captured.env(self.inputs)

    def run(self, staged, env: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The stages chained in order (every segment on fresh values)."""
        with torch.no_grad():
            return staged.run(self.env if env is None else env)

    def compile(self, request: PartitionRequest, strategy: str = "balanced"):
        return compile_graph(self.graph, request, strategy=strategy, cost_model="flops",
                             name=f"{self.name}/tiny", config_hash=self.bundle.architecture)


def build_tiny(name: str, seed: int = 0) -> Tiny:
    """Build, capture and cost one tiny model from scratch (no caching)."""
    bundle = zoo.build(zoo.load_yaml(name), "tiny", seed=seed)
    inputs = bundle.inputs(seed)
    with torch.no_grad():
        eager = bundle(inputs)
        captured = capture(bundle.module, bundle.specs, inputs, bundle.contract)
        costs = profile(captured, inputs, repeats=0, threads=1)
    graph = build_graph(captured, costs, "flops")
    return Tiny(name, bundle, inputs, captured, costs, graph, eager)


_cached = functools.cache(build_tiny)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """``tiny(name)`` -> the session's cached :class:`Tiny` for ``conf/model/<name>.yaml``."""
    return _cached


@pytest.fixture(scope="session")
def sd15() -> Tiny:
    return _cached("sd15")


@pytest.fixture(scope="session")
def sd21() -> Tiny:
    return _cached("sd21")


@pytest.fixture(scope="session")
def sdxl() -> Tiny:
    return _cached("sdxl")


@pytest.fixture(scope="session")
def fresh():
    """``fresh(name)`` -> a new, uncached :class:`Tiny` (independent build, capture, profile)."""
    return build_tiny


# --------------------------------------------------------------------------- asyncdiff-plan


@pytest.fixture(scope="session")
def compose_cfg():
    """``compose_cfg(*overrides)`` -> the root config as asyncdiff-plan composes it."""
    from hydra import compose, initialize_config_dir

    from experiments.common import CONF_DIR

    def make(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    return make


@pytest.fixture
def reuse_capture(monkeypatch, tiny):
    """``reuse_capture(name)``: make the asyncdiff-plan entry point reuse the session's build
    and capture of ``name`` (every model's capture is tested in test_capture.py; the entry
    point around it is what the callers test). dit is never patched: it goes the whole way."""
    import experiments.plan

    real_build, real_compile = zoo.build, experiments.plan.compile_model

    def patch(name: str) -> None:
        if name == "dit":
            return
        t = tiny(name)

        def build(cfg, variant=None, seed=0):
            if cfg["name"] != name or (variant or cfg.get("variant")) != "tiny" or seed != 0:
                return real_build(cfg, variant, seed)
            return t.bundle

        def compile_(module, specs, inputs, request, **kw):
            if module is t.bundle.module:
                assert all(torch.equal(inputs[k], t.inputs[k]) for k in t.inputs)
                kw["captured"] = t.captured
                if kw.get("cost_model") == "flops" and not kw.get("repeats"):
                    kw["costs"] = t.costs
            return real_compile(module, specs, inputs, request, **kw)

        monkeypatch.setattr(zoo, "build", build)
        monkeypatch.setattr(experiments.plan, "compile_model", compile_)
    return patch
