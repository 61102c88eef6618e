"""A stage of the module backend: the eager network, its blocks answered by owner.

Running stage ``s`` runs the user's own ``forward`` (through its contract) with every unit
(``blocks.py``) replaced for the duration of the call:

* a unit stage ``s`` owns runs on its real input and its output is recorded (the stage's
  published values);
* a unit another stage owns returns the value that stage produced — at this round in a
  warm-up step (fresh), at the previous round otherwise (stale): the values in ``env``, which
  the executors fill exactly as they fill cross-stage values of the graph backend (the
  official implementation's mechanism, AsyncDiff §3, made automatic).

A unit is a *call*: a module's calls are counted, and the trace's count says which call is
which unit. A unit answered by value does not run, so the calls its forward would make are
added to the counts as if made: a module called inside it and again elsewhere (one block
instance at two positions, weight sharing) keeps the index the trace gave each call. A
forward that calls its blocks otherwise than the trace saw (a data-dependent path) is an
error naming the stage and the block, never another stage's block run in its place.

Everything else (glue) runs on every device. A stage that does not emit ε stops the forward
right after its last unit (nothing after it is its work). Values cross as clones, so glue that
writes in place into a unit's output cannot change what another stage reads.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from partition.contract import DenoiserContract
from partition.spec import InputSpec, call_denoiser

OUTPUT = "output"  # the name ε travels under


class _StageDone(Exception):
    """Raised inside the forward once a stage's last unit has run."""


@dataclass
class UnitInfo:
    """What a stage knows about one unit call: its name, owner, output leaves."""

    path: str
    index: int
    owner: int
    names: tuple[str | None, ...]  # value name per output leaf (None: a constant leaf)
    constants: tuple                # the constant leaves (None for tensor leaves)
    spec: object                    # pytree spec of the output
    inside: tuple[tuple[str, int], ...] = ()  # calls made inside it, per module path


@dataclass
class BlockSegment:
    """Stage ``stage`` of a module-backend split (the graph backend's ``Segment`` interface:
    ``outputs = segment(env)``)."""

    stage: int
    start: int  # unit positions [start, stop) owned
    stop: int
    model: nn.Module
    units: tuple[UnitInfo, ...]   # every unit of the split, execution order
    specs: tuple[InputSpec, ...]
    contract: DenoiserContract
    last: bool                    # emits ε
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    conditioning: tuple[str, ...] = ()
    prologue: bool = False
    # how the network is run on the named inputs (default: the model through its contract);
    # the drop-in passes the pipeline's original forward with its fixed arguments
    runner: object = field(default=None, repr=False)
    calls: tuple[tuple[str, int], ...] = ()  # how often the forward calls each module

    def __post_init__(self) -> None:
        model_inputs = tuple(s.name for s in self.specs)
        read = tuple(n for u in self.units[:self.stop if not self.last else None]
                     if u.owner != self.stage for n in u.names if n is not None)
        self.inputs = model_inputs + read
        produced = tuple(n for u in self.units[self.start:self.stop] for n in u.names
                         if n is not None)
        self.outputs = produced + ((OUTPUT,) if self.last else ())

    # --- running -----------------------------------------------------------------------------
    def __call__(self, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {s.name: env[s.name] for s in self.specs}
        produced: dict[str, torch.Tensor] = {}
        by_call = {(u.path, u.index): u for u in self.units}
        last_mine = (self.units[self.stop - 1].path, self.units[self.stop - 1].index)
        counts: dict[str, int] = {}
        saved = {}
        stopped = False
        for path in {u.path for u in self.units}:
            mod = self.model.get_submodule(path)
            saved[path] = mod.__dict__.get("forward")
            mod.__dict__["forward"] = self._proxy(path, mod, by_call, counts, env, produced,
                                                  last_mine)
        try:
            out = self.runner(inputs) if self.runner is not None else \
                call_denoiser(self.model, inputs, self.contract, self.specs)
        except _StageDone:
            out, stopped = None, True
        finally:
            for path, fwd in saved.items():
                mod = self.model.get_submodule(path)
                if fwd is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.__dict__["forward"] = fwd
        missed = [u for u in self.units[self.start:self.stop]
                  if any(n is not None and n not in produced for n in u.names)]
        if missed or not (self.last or stopped):
            u = missed[0] if missed else self.units[self.stop - 1]
            raise RuntimeError(
                f"module backend, stage {self.stage}: the forward ended without calling block "
                f"'{u.path}#{u.index}' (this stage's) as it did when traced: the network calls "
                "its blocks otherwise on these inputs (a data-dependent path?), which a split "
                "into blocks cannot follow")
        if self.last:
            produced[OUTPUT] = out
        return produced

    def _proxy(self, path, mod, by_call, counts, env, produced, last_mine):
        # a forward already set on the instance (a diffusers hook's) is what the call runs
        original = mod.__dict__.get("forward") or type(mod).forward.__get__(mod)

        def forward(*args, **kwargs):
            k = counts.get(path, 0)
            counts[path] = k + 1
            u = by_call.get((path, k))
            if u is None:  # a call of this module that is not a block (glue): it just runs
                return original(*args, **kwargs)
            if u.owner == self.stage:
                out = original(*args, **kwargs)
                leaves, _ = pytree.tree_flatten(out)
                for name, leaf in zip(u.names, leaves):
                    if name is not None:
                        produced[name] = leaf.detach().clone()
                if (path, k) == last_mine and not self.last:
                    raise _StageDone
                return out
            for inner, n in u.inside:  # answered, not run: the calls inside it still count
                counts[inner] = counts.get(inner, 0) + n
            missing = [name for name in u.names if name is not None and name not in env]
            if missing:
                raise RuntimeError(
                    f"module backend, stage {self.stage}: the forward called block "
                    f"'{path}#{k}' (stage {u.owner}'s), whose value is not among this stage's "
                    "inputs: the network calls its blocks otherwise on these inputs than when "
                    "it was traced (a data-dependent path?), which a split into blocks cannot "
                    "follow")
            leaves = [env[name].clone() if name is not None else const
                      for name, const in zip(u.names, u.constants)]
            return pytree.tree_unflatten(leaves, u.spec)
        return forward

    # --- weights -----------------------------------------------------------------------------
    def owned_paths(self) -> list[str]:
        return [u.path for u in self.units[self.start:self.stop]]

    def foreign(self) -> dict[int, torch.Tensor]:
        """The parameters and buffers (by id) only other stages use: those of the units this
        stage does not run and of the calls inside them, less those of every module it runs
        (its units and the calls inside them, the glue). A module called both in another
        stage's unit and by this stage (weight sharing) is this stage's too."""
        skipped: dict[str, int] = {}
        for u in self.units:
            if u.owner != self.stage:
                for path, n in ((u.path, 1), *u.inside):
                    skipped[path] = skipped.get(path, 0) + n
        run = {path for path, n in self.calls if n > skipped.get(path, 0)}
        keep = {id(t) for p in self.owned_paths() for t in self._held(p, recurse=True)}
        keep |= {id(t) for p in run for t in self._held(p, recurse=False)}
        return {id(t): t for p in skipped for t in self._held(p, recurse=True)
                if id(t) not in keep}

    def _held(self, path: str, recurse: bool) -> list[torch.Tensor]:
        mod = self.model.get_submodule(path)
        return [*mod.parameters(recurse=recurse), *mod.buffers(recurse=recurse)]

    def tensors(self) -> list[torch.Tensor]:
        """Parameters and buffers this stage uses: its units and the glue, not the units of
        other stages."""
        foreign = self.foreign()
        return [t for t in [*self.model.parameters(), *self.model.buffers()]
                if id(t) not in foreign]

    @property
    def gm(self) -> nn.Module:
        return self.model

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors() if isinstance(t, nn.Parameter))

    def to(self, device) -> "BlockSegment":
        self.model.to(device)
        return self

    def stripped(self) -> "BlockSegment":
        """A copy whose model holds no tensor of another stage's units (on the meta device):
        what one worker process receives."""
        memo = {}
        for key, t in self.foreign().items():
            meta = t.detach().to("meta")
            memo[key] = nn.Parameter(meta, requires_grad=False) \
                if isinstance(t, nn.Parameter) else meta
        out = copy.copy(self)
        out.model = copy.deepcopy(self.model, memo)
        return out
