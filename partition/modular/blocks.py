"""The module backend's graph: the network's own blocks, found from one eager forward.

For networks ``torch.export`` cannot capture (data-dependent Python: ``len(set(lengths))``,
``.numpy()`` in routing, ``if seq_len > k:``), stages are sets of the network's own modules,
run eagerly. Hooks on every module record, for each *call* in execution order: its place in
the call tree, its output (a pytree of tensors), its inclusive time and FLOPs. A second
forward with another latent says which calls are *trunk* (their output depends on the latent,
or on a ``per_step`` input): only those can be owned by a stage. Everything else — the code
between blocks, conditioning modules, the forward of a block that was refined into its
children — is *glue*: it runs on every device, every step.

Blocks (*units*) are chosen automatically: the root's trunk calls, refined (a call replaced by
its own trunk calls) while the costliest one exceeds a share of the trunk that leaves the
balance room (``refine_share``) — how the official code's hand-written split tables are made,
done here from the module tree and measured costs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from partition.contract import DenoiserContract
from partition.cost import CPU_ATTENTION, tensor_bytes
from partition.spec import InputSpec, call_denoiser
from partition.timing import host_clock


@dataclass
class Call:
    """One call of one module during the forward."""

    path: str
    index: int            # how many times this module was called before (a reused block)
    parent: int | None    # the enclosing call (index into the call list)
    start: int            # execution order of its start
    flops: int = 0        # inclusive
    ms: float = 0.0       # inclusive
    leaves: list = field(default_factory=list)  # flattened output (tensors and constants)
    spec: object = None   # pytree spec of the output
    trunk: bool = False
    flattenable: bool = True

    @property
    def name(self) -> str:
        return f"{self.path}#{self.index}" if self.path else f"<root>#{self.index}"


@dataclass
class BlockGraph:
    """The units (blocks owned by stages) in execution order, with costs; everything the
    module backend's strategies, stages and plan need (the counterpart of ``TrunkGraph``)."""

    model: nn.Module
    specs: tuple[InputSpec, ...]
    contract: DenoiserContract
    calls: list[Call]
    units: list[int]            # indices into ``calls``, execution order
    weights: np.ndarray         # cost of each unit under the cost model
    glue_cost: float            # cost of everything that is not a unit (runs everywhere)
    total_flops: int
    glue_flops: int
    cost_model: str
    threads: int
    ms_measured: bool
    output: torch.Tensor        # the eager model's prediction on the example (shape, dtype)

    @property
    def size(self) -> int:
        return len(self.units)

    def unit(self, i: int) -> Call:
        return self.calls[self.units[i]]

    @property
    def modules(self) -> list[str]:
        return [self.unit(i).path for i in range(self.size)]

    def unit_params(self, i: int) -> dict[str, torch.Tensor]:
        mod = self.model.get_submodule(self.unit(i).path)
        prefix = f"{self.unit(i).path}." if self.unit(i).path else ""
        return {prefix + k: p for k, p in mod.named_parameters()}

    def inside(self, i: int) -> tuple[tuple[str, int], ...]:
        """The calls made inside unit ``i`` (not the unit's own), per module path: a stage that
        answers the unit by its owner's value makes none of them, yet a module called there
        and again later (weight sharing) is told apart by how often it was called before."""
        start = self.units[i]
        inner: dict[str, int] = {}
        for j in range(start + 1, len(self.calls)):
            parent = self.calls[j].parent
            while parent is not None and parent != start:
                parent = self.calls[parent].parent
            if parent is None:
                break  # the calls of a subtree are contiguous, in call order
            inner[self.calls[j].path] = inner.get(self.calls[j].path, 0) + 1
        return tuple(inner.items())

    def call_counts(self) -> tuple[tuple[str, int], ...]:
        """How often the forward called each module, per path."""
        counts: dict[str, int] = {}
        for c in self.calls:
            counts[c.path] = counts.get(c.path, 0) + 1
        return tuple(counts.items())

    def unit_bytes(self, i: int) -> int:
        return sum(tensor_bytes(v) for v in self.unit(i).leaves)

    def graph_hash(self) -> str:
        h = hashlib.sha256()
        for i in range(self.size):
            u = self.unit(i)
            shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v) for v in u.leaves]
            h.update(f"{u.name}|{shapes}\n".encode())
        return h.hexdigest()[:16]


class _Tracer:
    """Hooks on every module: the call tree, outputs, inclusive FLOPs and time."""

    def __init__(self, model: nn.Module, counter: FlopCounterMode | None):
        self.calls: list[Call] = []
        self.stack: list[int] = []
        self.count: dict[str, int] = {}
        self.counter = counter
        self.clock = host_clock(torch.get_num_threads())  # [Note: the CPU clock]
        self.marks: dict[int, tuple[float, int]] = {}
        self.hooks = []
        for path, mod in model.named_modules():
            self.hooks.append(mod.register_forward_pre_hook(lambda m, a, path=path: self.pre(path)))
            self.hooks.append(mod.register_forward_hook(
                lambda m, a, o, path=path: self.post(path, o)))

    def pre(self, path: str) -> None:
        k = self.count.get(path, 0)
        self.count[path] = k + 1
        self.calls.append(Call(path, k, self.stack[-1] if self.stack else None, len(self.calls)))
        self.stack.append(len(self.calls) - 1)
        flops = self.counter.get_total_flops() if self.counter is not None else 0
        self.marks[len(self.calls) - 1] = (self.clock(), flops)

    def post(self, path: str, out) -> None:
        i = self.stack.pop()
        t0, f0 = self.marks.pop(i)
        call = self.calls[i]
        call.ms = (self.clock() - t0) * 1e3
        call.flops = (self.counter.get_total_flops() if self.counter is not None else 0) - f0
        leaves, spec = pytree.tree_flatten(out)
        call.flattenable = all(isinstance(v, (torch.Tensor, int, float, bool, str, type(None)))
                               for v in leaves)
        call.leaves = [v.detach() if isinstance(v, torch.Tensor) else v for v in leaves]
        call.spec = spec

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def trace_calls(model: nn.Module, specs, inputs, contract, *, count_flops: bool) -> tuple[list[Call], torch.Tensor, int]:
    """One eager forward under hooks: the calls, the output and the total FLOPs."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) if count_flops else None
    tracer = _Tracer(model, counter)
    try:
        with torch.no_grad():
            if counter is not None:
                with counter:
                    out = call_denoiser(model, inputs, contract, specs)
                total = int(counter.get_total_flops())
            else:
                out = call_denoiser(model, inputs, contract, specs)
                total = 0
    finally:
        tracer.remove()
    return tracer.calls, out, total


def mark_trunk(model, specs, inputs, contract, calls: list[Call]) -> None:
    """A call is trunk when its output changes with the latent (and the per-step inputs)."""
    moved = dict(inputs)
    g = torch.Generator().manual_seed(1234)
    for s in specs:
        if s.role in ("latent", "per_step") and inputs[s.name].is_floating_point():
            moved[s.name] = torch.randn(inputs[s.name].shape, generator=g,
                                        dtype=inputs[s.name].dtype).to(inputs[s.name].device)
    again, _, _ = trace_calls(model, specs, moved, contract, count_flops=False)
    if [(c.path, c.index) for c in again] != [(c.path, c.index) for c in calls]:
        # another latent took another path through the modules: mark every call trunk,
        # nothing can be told apart (and units are refined only where they agree)
        for c in calls:
            c.trunk = True
        return
    for c, d in zip(calls, again):
        c.trunk = len(c.leaves) != len(d.leaves) or any(
            _differs(a, b) for a, b in zip(c.leaves, d.leaves))


def _differs(a, b) -> bool:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return True
    if isinstance(a, torch.Tensor):
        return a.shape != b.shape or not torch.equal(a, b)
    return a != b


def choose_units(calls: list[Call], n: int, weight) -> list[int]:
    """The root's trunk calls, refined while that makes a step faster.

    A step of an N-stage split costs about its slowest stage plus the glue (which every device
    runs); refining a unit (replacing it by its own trunk calls) can balance the stages better,
    but its forward becomes glue. Refine the unit whose refinement lowers that estimate most,
    while one does (and while there are fewer units than stages)."""
    children: dict[int | None, list[int]] = {}
    for i, c in enumerate(calls):
        children.setdefault(c.parent, []).append(i)
    root = children[None][0]
    total = weight(calls[root])

    def trunk_children(i: int) -> list[int]:
        return [j for j in children.get(i, []) if calls[j].trunk and calls[j].flattenable]

    def step(units: list[int]) -> float:
        w = np.array([weight(calls[i]) for i in sorted(units, key=lambda i: calls[i].start)])
        glue = max(total - float(w.sum()), 0.0)
        if len(w) < n:
            return float("inf")
        return _min_max(w, n) + glue

    units = trunk_children(root)
    if not units:
        return []
    best = step(units)
    while True:
        options = []
        for i in units:
            kids = trunk_children(i)
            if kids:
                trial = [j for j in units if j != i] + kids
                options.append((step(trial), calls[i].start, trial))
        if not options:
            break
        score, _, trial = min(options, key=lambda o: (o[0], o[1]))
        if not (score < best * (1 - 1e-3) or (best == float("inf") and score < best)):
            break
        units, best = trial, score
    return sorted(units, key=lambda i: calls[i].start)


def _min_max(w: np.ndarray, n: int) -> float:
    """The slowest stage of the best contiguous split of weights ``w`` into ``n`` stages."""
    from partition.strategies.balanced import min_max_cuts
    q = np.arange(len(w) + 1)
    prefix = np.concatenate([[0.0], np.cumsum(w)])
    cuts = min_max_cuts(np.triu(prefix[None, :] - prefix[:, None], 1), q, n)
    bounds = [0, *cuts, len(w)]
    return max(float(prefix[b] - prefix[a]) for a, b in zip(bounds, bounds[1:]))
