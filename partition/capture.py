"""Capture a denoiser as a flat ``torch.fx.GraphModule`` with ``torch.export`` (non-strict).

``torch.fx.symbolic_trace`` fails on every diffusers model (their ``forward`` iterates over
shapes and calls ``len``/``int`` on them); non-strict export specialises on the example shapes
and is bit-exact with eager. One capture per input shape (batch, resolution, frames).

Export's graph keeps in-place writes as side-effect nodes: ``grid[:, 0:1] = x`` on a tensor
made inside ``forward`` becomes ``copy_(slice(grid), x)`` whose result nothing reads, and the
later reads of ``grid`` point at the node that *made* it. Cut into stages such a write would
be lost (nothing depends on it). So a graph with any mutating operator is functionalized
(``ExportedProgram.run_decompositions({})``: every write becomes a value that its readers
depend on; no operator is decomposed). Graphs without one are kept as captured (the pass
re-traces the model: seconds even for tiny ones). A denoiser that mutates its own buffers or
inputs on every call is stateful and is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import traceback
import types
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from partition.contract import ContractError, DenoiserContract
from partition.spec import InputSpec, call_denoiser, latent_name


class CaptureError(RuntimeError):
    """Raised when ``torch.export`` cannot capture a model; names the module and source line.
    ``compile_model`` then falls back to the module backend (``partition/modular``)."""


class PositionalDenoiser(nn.Module):
    """``forward(*tensors)`` -> noise prediction, so no dicts or dataclasses reach the tracer;
    the model is called through its contract ([Note: denoiser contract])."""

    def __init__(self, model: nn.Module, specs: tuple[InputSpec, ...],
                 contract: DenoiserContract | None = None):
        super().__init__()
        self.model = model
        self.specs = tuple(specs)
        self.contract = contract or DenoiserContract()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return call_denoiser(self.model, dict(zip((s.name for s in self.specs), args)),
                             self.contract, self.specs)


@dataclass
class Captured:
    """A captured denoiser: the graph plus which placeholder is which input."""

    gm: fx.GraphModule
    specs: tuple[InputSpec, ...]
    placeholders: dict[str, str]  # input name -> placeholder node name
    contract: DenoiserContract = DenoiserContract()
    functionalized: bool = False  # in-place writes were turned into values (module docstring)
    model: nn.Module | None = None  # the eager module it was captured from

    @property
    def latent(self) -> str:
        """Placeholder node name of the latent input."""
        return self.placeholders[latent_name(self.specs)]

    def env(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs keyed by spec name -> keyed by placeholder node name."""
        return {self.placeholders[s.name]: inputs[s.name] for s in self.specs}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.gm(*(inputs[s.name] for s in self.specs))

    def eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The eager model on ``inputs``, called through the capture's contract."""
        return call_denoiser(self.model, inputs, self.contract, self.specs)

    def graph_hash(self) -> str:
        """Structure of the graph (ops, wiring, shapes): equal captures hash equal."""
        h = hashlib.sha256()
        for n in self.gm.graph.nodes:
            val = n.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
            h.update(f"{n.op}|{n.name}|{n.target}|{n.args}|{n.kwargs}|{shape}\n".encode())
        return h.hexdigest()[:16]


def capture(model: nn.Module, specs: tuple[InputSpec, ...] | list[InputSpec],
            inputs: dict[str, torch.Tensor], contract: DenoiserContract | None = None) -> Captured:
    """Export ``model`` called on ``inputs`` (keyed by ``specs`` names) through ``contract``
    to a GraphModule, functionalized where it writes in place (module docstring)."""
    specs = tuple(specs)
    contract = contract or DenoiserContract()
    latent_name(specs)  # validates exactly one latent
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise ValueError(f"inputs: missing example values for {missing}")
    wrapper = PositionalDenoiser(model, specs, contract).eval()
    args = tuple(inputs[s.name] for s in specs)
    stack: list[str] = []
    hooks = _track_module_stack(wrapper, stack)
    saved = _module_state(model)
    try:
        with torch.no_grad(), _quiet_symbolic_shapes():
            ep = torch.export.export(wrapper, args, strict=False)
    except Exception as err:  # re-raised with the failing module and source line
        cause = err
        while cause is not None and not isinstance(cause, ContractError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # the call itself is wrong: no backend can run it
            raise cause from None
        raise CaptureError(_describe_failure(err, stack)) from err
    finally:
        for h in hooks:
            h.remove()
        _restore_module_state(model, saved)
    _refuse_state_mutation(ep)
    functionalized = False
    if mutating_nodes(ep.graph):
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.13's run_decompositions deep-copies its own module call graph, and
            # copying a pytree leaf spec raises the FutureWarning meant for callers testing
            # isinstance(spec, LeafSpec); nothing here does, so only that one is silenced
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` "
                                    "is deprecated", category=FutureWarning)
            ep = ep.run_decompositions({})
        functionalized = True
        left = mutating_nodes(ep.graph)
        if left:
            raise CaptureError(f"in-place operators {sorted({str(n.target) for n in left})} "
                               "survive functionalization; the graph cannot be staged exactly")
    gm = ep.module()
    _drop_guards(gm)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(specs):
        raise CaptureError(f"captured graph has {len(placeholders)} inputs, expected {len(specs)}")
    return Captured(gm=gm, specs=specs, placeholders=dict(zip((s.name for s in specs), placeholders)),
                    contract=contract, functionalized=functionalized, model=model)


@contextlib.contextmanager
def _quiet_symbolic_shapes():
    """On a data-dependent guard torch prints the whole partial graph to stderr; the
    CaptureError says where the capture failed in one line, so that dump is held back.
    Anything else written to stderr meanwhile (warnings) is passed on."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    except Exception as err:
        partial = str(getattr(err, "partial_fx_graph", "") or "")
        sys.stderr.write(buf.getvalue().replace(partial, "").strip("\n") + "\n"
                         if buf.getvalue().replace(partial, "").strip() else "")
        raise
    else:
        sys.stderr.write(buf.getvalue())


_MODULE_SLOTS = {"_parameters", "_buffers", "_modules"}


def _module_state(model: nn.Module) -> dict[int, tuple[object, dict]]:
    """Every module's plain attributes (not its parameters, buffers or children), and those
    of the plain Python objects it holds (a rotary helper object): object id -> (object, a
    shallow copy of its ``__dict__``)."""
    saved: dict[int, tuple[object, dict]] = {}
    for m in model.modules():
        attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_SLOTS}
        saved[id(m)] = (m, attrs)
        for v in attrs.values():
            if _plain_object(v) and id(v) not in saved:
                saved[id(v)] = (v, dict(vars(v)))
    return saved


def _plain_object(v) -> bool:
    return hasattr(v, "__dict__") and not isinstance(
        v, (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType, types.ModuleType))


def _restore_module_state(model: nn.Module, saved: dict[int, tuple[object, dict]]) -> None:
    """Undo what tracing left in the model's Python state: a table a module (or a helper
    object it holds) fills lazily on its first call (``self.freqs_cis = …``), or a
    ``functools.lru_cache`` on a method, filled during the trace, would hold traced values
    that break every later eager call."""
    for obj, before in saved.values():
        now = vars(obj)
        for k in [k for k in now if k not in _MODULE_SLOTS and k not in before]:
            delattr(obj, k)
        for k, v in before.items():
            if now.get(k) is not v:
                setattr(obj, k, v)
    for m in model.modules():
        for name in dir(type(m)):
            attr = getattr(type(m), name, None)
            if callable(getattr(attr, "cache_clear", None)):
                attr.cache_clear()


def mutating_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Nodes of operators that write into one of their arguments (``copy_``, ``fill_``, …)."""
    return [n for n in graph.nodes if n.op == "call_function"
            and getattr(getattr(n.target, "_schema", None), "is_mutable", False)]


def _refuse_state_mutation(ep) -> None:
    sig = ep.graph_signature
    written = {**sig.buffers_to_mutate, **sig.user_inputs_to_mutate}
    if written:
        names = sorted(str(v).removeprefix("model.") for v in written.values())
        raise CaptureError(f"the denoiser writes into {names} on every call (a buffer or an "
                           "input it keeps state in: a cache, a counter, a hook); a stateful "
                           "network cannot be split into stages exactly. Disable the state "
                           "(e.g. remove the caching hook) before compiling")


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
    module = stack[-1] if stack else ""
    module = "" if module == "model" else module.removeprefix("model.")
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
            f"{type(err).__name__}: {first}. Make that code traceable (tensor code instead of "
            f"data-dependent Python), or run the network with the module backend "
            f"(backend='module': stages are sets of its own blocks, run eagerly; "
            f"docs/partitioning.md), which compile_model picks by itself when capture fails.")


def move_graph(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """Move ``gm`` to ``device`` in place: parameters and buffers, and the ``device=``
    arguments export baked into the graph (``arange(..., device=cpu)`` and friends)."""
    return retarget_devices(gm, device).to(device)


def retarget_devices(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """Point the ``device=`` arguments export baked into ``gm`` at ``device``, in place,
    leaving its tensors where they are (a capture made on the meta device names ``meta``)."""
    device = torch.device(device)
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": device}
    gm.recompile()
    return gm
