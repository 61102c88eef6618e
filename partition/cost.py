"""Per-node cost of a captured graph: measured time, FLOPs (torch or fvcore), output bytes.

Convention (stated once, STYLE 9): **FLOPs count a multiply-add as 2** (torch's
FlopCounterMode); MACs = FLOPs / 2 (fvcore's unit). Only matmul, convolution and attention
are counted; norms, activations, adds and data movement count as zero by that convention.
Operators that are neither counted nor of those kinds are listed in ``NodeCosts.uncounted``
rather than silently counted as zero.

The stock FlopCounterMode registers only the CUDA attention kernels; on CPU dispatch reaches
``aten._scaled_dot_product_flash_attention_for_cpu``, which we map (torch's FLOP counter does
not know it).
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from partition.capture import Captured, PositionalDenoiser
from partition.spec import call_denoiser
from partition.threads import intra_op_threads
from partition.timing import clock_name

aten = torch.ops.aten
COST_MODELS: tuple[str, ...] = ("time", "flops", "fvcore")


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # the counter hands us shapes


CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}

# Ops that count as zero FLOPs by convention, beyond those tagged pointwise or views.
_ZERO_BY_CONVENTION = {
    "cat", "stack", "clone", "copy", "copy_", "_to_copy", "empty", "empty_like", "zeros", "ones",
    "zeros_like", "ones_like", "full", "full_like", "arange", "expand", "split", "split_with_sizes",
    "chunk", "unbind", "index", "index_select", "gather", "repeat", "repeat_interleave",
    "constant_pad_nd", "pad", "_unsafe_view", "lift_fresh", "detach", "alias", "scalar_tensor",
    "native_group_norm", "native_layer_norm", "group_norm", "layer_norm", "_softmax", "softmax",
    "_safe_softmax",  # softmax that maps fully masked rows to 0 (SDPA's math path)
    "mean", "sum", "var_mean", "var", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_bilinear2d", "_upsample_nearest_exact2d", "rms_norm", "_fused_rms_norm", "amax",
    "max", "min", "linspace", "dropout", "native_dropout", "flip", "roll", "tril", "triu",
    "masked_fill", "where", "fill_", "fill", "embedding", "cumsum", "outer", "topk", "sort",
    "unsqueeze", "squeeze", "t", "transpose", "permute", "view", "reshape", "slice", "select",
    "flatten", "unflatten", "contiguous", "_log_softmax", "broadcast_to", "new_zeros", "new_ones",
    "new_empty", "_native_batch_norm_legit_no_training", "batch_norm", "clamp", "norm",
    "linalg_vector_norm", "avg_pool2d", "_adaptive_avg_pool2d", "max_pool2d_with_indices",
    "_assert_tensor_metadata", "sym_size", "_assert_scalar", "item", "to", "device",
}


class CostError(RuntimeError):
    """The cost pass failed after capture; the message names the node and its module."""


@dataclass
class NodeCosts:
    """Costs of every compute node of a captured graph, keyed by node name.

    ``counted_on``: ``fake`` (FLOPs and bytes from one pass over fake tensors, no arithmetic)
    or ``real`` (a graph with data-dependent shapes, e.g. ``nonzero``, counted on the example
    values). ``eager``: the eager model's output from the timed passes (at ``threads``,
    under ``no_grad``), which the verification reuses instead of running the model again;
    ``captured``: the captured graph's output where the count ran it.
    """

    flops: dict[str, int]
    ms: dict[str, float]
    out_bytes: dict[str, int]
    uncounted: dict[str, int] = field(default_factory=dict)  # aten op -> how many dispatches
    fvcore_flops: dict[str, float] | None = None
    threads: int = 1
    repeats: int = 0
    device: str = "cpu"  # where ``ms`` was measured
    clock: str = "wall"  # how (partition.timing.clock_name)
    counted_on: str = "fake"
    eager: torch.Tensor | None = field(default=None, repr=False, compare=False)
    captured: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def weights(self, model: str) -> dict[str, float]:
        """Per-node weights that the partitioner balances under cost model ``model``."""
        if model == "time":
            if not self.ms:
                raise ValueError("cost_model=time needs measured times (profile with repeats >= 1)")
            return dict(self.ms)
        if model == "flops":
            return {k: float(v) for k, v in self.flops.items()}
        if model == "fvcore":
            if self.fvcore_flops is None:
                raise ValueError("cost_model=fvcore needs fvcore counts (profile with fvcore_model=the eager model)")
            return dict(self.fvcore_flops)
        raise ValueError(f"cost_model={model!r}; allowed: {', '.join(COST_MODELS)}")


class CostModel(Protocol):
    """Anything that maps a captured graph to per-node weights."""

    def __call__(self, captured: Captured, inputs: dict[str, torch.Tensor]) -> dict[str, float]: ...


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class _OpRecorder(TorchDispatchMode):
    # higher-order operators (flex_attention, …) pass through: their inner ops are recorded
    supports_higher_order_operators = True

    def __init__(self, known) -> None:
        super().__init__()
        self.known = known
        self.uncounted: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            self.uncounted[str(func.name())] += 1
            return func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if not (packet in self.known or func in self.known or torch.Tag.pointwise in func.tags
                or func.is_view or packet.__name__ in _ZERO_BY_CONVENTION):
            self.uncounted[str(packet)] += 1
        return func(*args, **(kwargs or {}))


class _Profiler(fx.Interpreter):
    """One pass over fake tensors: FLOPs and output bytes per node, no arithmetic done."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: dict[str, int] = {}
        self.out_bytes: dict[str, int] = {}
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
        self.recorder = _OpRecorder({**counter.flop_registry, **CPU_ATTENTION})

    def run_node(self, n: fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        try:
            with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter, \
                    self.recorder:
                out = super().run_node(n)
            self.flops[n.name] = int(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - the counter's modes cannot run this node
            # (a higher-order operator such as flex_attention): run it as it is and report
            # it as uncounted rather than fail or count it silently as zero
            out = super().run_node(n)
            self.flops[n.name] = 0
            self.recorder.uncounted[str(n.target)] += 1
        self.out_bytes[n.name] = tensor_bytes(out)
        return out


def _count(gm: fx.GraphModule, args: list[torch.Tensor],
           fake_only: bool = False) -> tuple[_Profiler, str, object]:
    """FLOPs and bytes per node: over fake tensors, or on the real values where a shape
    depends on data (fake tensors cannot say how many elements ``nonzero`` returns) unless
    ``fake_only`` (the weights hold no values yet)."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            prof = _Profiler(gm)
            prof.run(*(mode.from_tensor(a) for a in args))
        return prof, "fake", None
    except Exception as err:  # noqa: BLE001 - any fake-tensor failure: count on real values
        if fake_only:
            raise CostError(f"the cost pass needs the weights' values ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                            "); load this denoiser whole") from err
    prof = _Profiler(gm)
    try:
        out = prof.run(*args)
    except Exception as err:
        node = _failed_node(gm, prof)
        raise CostError(f"cost pass failed at node {node.name!r} ({node.target}) in module "
                        f"'{node_module(node) or '<root>'}': {type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    return prof, "real", out


def _failed_node(gm: fx.GraphModule, prof: _Profiler) -> fx.Node:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.name not in prof.flops:
            return n
    return next(n for n in gm.graph.nodes if n.op == "output")


def profile(captured: Captured, inputs: dict[str, torch.Tensor], *, repeats: int = 3,
            threads: int | None = None, fvcore_model: torch.nn.Module | None = None,
            warmup: bool = False, device: torch.device | str | None = None,
            fake_only: bool = False) -> NodeCosts:
    """Count every compute node once for FLOPs and bytes; time the model ``repeats`` times.

    FLOPs and bytes come from one pass over fake tensors (free even for full-size models; on
    the real values where a shape depends on data). Time is each module's own time in the
    eager model, median over the repeats (after one untimed warm-up pass if ``warmup``: the
    first pass's kernel set-up is a few ms of a forward of seconds, and the stages' own timing
    corrects what it skews: ``partition/refine.py``), spread over the nodes traced in it
    (``partition/timing.py``), taken with ``threads`` intra-op threads (the thread count each
    worker will run with) on the clock of [Note: the CPU clock]. ``device``
    times a copy of the model moved there (the stages' target GPU: time shares on a GPU are
    not those of a CPU, nor FLOP shares); by default, where ``inputs`` are. Measure once and
    share the result: timings are noisy, so two measurements give two plans. ``fake_only``:
    never count on the real values (weights not loaded yet: ``asyncdiff/dropin/lazy.py``).
    """
    args = [inputs[s.name] for s in captured.specs]
    with intra_op_threads(threads) as used:
        with torch.no_grad():
            prof, counted_on, captured_out = _count(captured.gm, args, fake_only)
            ms, eager, where = {}, None, "cpu"
            if repeats:
                ms, eager, where = _time_modules(captured, inputs, repeats, warmup, device)
            clock = clock_name(used, torch.device(where).type == "cuda")
        fv = (fvcore_node_flops(captured, fvcore_model, inputs, prof.flops)
              if fvcore_model is not None else None)
    return NodeCosts(flops=prof.flops, ms=ms, out_bytes=prof.out_bytes,
                     uncounted=dict(sorted(prof.recorder.uncounted.items())), fvcore_flops=fv,
                     threads=used,
                     repeats=repeats, device=where, clock=clock, counted_on=counted_on,
                     eager=eager,
                     captured=captured_out)


def _time_modules(captured: Captured, inputs: dict[str, torch.Tensor], repeats: int,
                  warmup: bool, device) -> tuple[dict[str, float], torch.Tensor | None, str]:
    """Per-node ms from the eager model's module times; the eager output when it ran where
    the inputs are (the verification's reference)."""
    from partition.timing import ModuleClock, own_times, spread_over_nodes

    model = captured.model
    if model is None:
        raise ValueError("cost_model=time: this capture has no eager model to time")
    here = captured_device(inputs, captured.specs)
    where = torch.device(device) if device is not None else here
    if where.type != here.type:
        model = copy.deepcopy(model).to(where)
        inputs = {k: v.to(where) for k, v in inputs.items()}

    def forward():
        return call_denoiser(model, inputs, captured.contract, captured.specs)

    if warmup:  # first calls pay for kernel setup
        forward()
    clock = ModuleClock(model, cuda=where.type == "cuda")
    try:
        for _ in range(repeats):
            out = forward()
            clock.end_pass()
    finally:
        clock.remove()
    ms = spread_over_nodes(own_times(clock.median_inclusive()), captured.gm, node_module)
    return ms, (out if where.type == here.type else None), str(where)


def captured_device(inputs: dict[str, torch.Tensor], specs) -> torch.device:
    return inputs[specs[0].name].device


def node_module(n: fx.Node) -> str:
    """Qualified path of the innermost module a node was traced in ('' for top-level glue)."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path.removeprefix("model.") if path != "model" else ""
    return path


def _sdpa_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def fvcore_node_flops(captured: Captured, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                      torch_flops: dict[str, int]) -> dict[str, float]:
    """fvcore's per-module counts (MACs ×2, to share the FLOP convention) mapped onto nodes.

    fvcore traces with ``torch.jit.trace`` and counts per module, not per fx node: a module's
    own count (its total minus its children's) is spread over the nodes traced inside it, in
    proportion to torch's per-node FLOPs (evenly where those are all zero).
    """
    from fvcore.nn import FlopCountAnalysis

    wrapper = PositionalDenoiser(model, captured.specs, captured.contract).eval()
    args = tuple(inputs[s.name] for s in captured.specs)
    fca = FlopCountAnalysis(wrapper, args)
    fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    fca.tracer_warnings("none")
    by_module = fca.by_module()
    # Both name modules by their path under the wrapper: "model.down_blocks.0.resnets.0".
    own: dict[str, float] = {}
    for path, total in by_module.items():
        children = sum(v for p, v in by_module.items()
                       if p.startswith(path + ".") and p.count(".") == path.count(".") + 1) \
            if path else sum(v for p, v in by_module.items() if p and "." not in p)
        own[path] = float(total - children)
    nodes_by_module: dict[str, list[str]] = {}
    for n in captured.gm.graph.nodes:
        if n.op == "call_function":
            stack = n.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            nodes_by_module.setdefault(path, []).append(n.name)
    out = {name: 0.0 for name in torch_flops}
    for path, macs in own.items():
        target = path
        names = nodes_by_module.get(target)
        while names is None and "." in target:
            target = target.rsplit(".", 1)[0]
            names = nodes_by_module.get(target)
        if not names or macs == 0:
            continue
        weights = [torch_flops.get(n, 0) for n in names]
        total_w = sum(weights)
        for n, w in zip(names, weights):
            out[n] += 2 * macs * (w / total_w if total_w else 1 / len(names))
    return out
