"""The diffusers drop-in: ``asyncdiff.parallelize(pipe, n=…)`` on an unmodified pipeline.

    handle = asyncdiff.parallelize(pipe, n=2, stride=1, warmup=1)
    image = pipe(prompt_embeds=…, num_inference_steps=50).images[0]
    handle.detach()  # the pipeline is exactly as before

The denoiser (``pipe.unet`` or ``pipe.transformer``) stays the same module object (the
pipeline reads its ``config``, ``dtype``, ``device``); only its *instance* ``forward`` is
replaced by a proxy (a ``forward`` the user set on the module before is refused, one set
after wraps the proxy and sees every call). On the first call of a given shape the proxy
captures the call with the original forward, compiles it into N stages and answers every
call with the ε of the asynchronous pipeline (AsyncDiff, Chen et al. 2024; the rules are
[Note: staleness] in ``asyncdiff/timeline.py``), in the form the model answers (a tuple for
``return_dict=False``, else its output dataclass). The pipeline's own loop, guidance and scheduler run unchanged:
the async runtime enters only as the denoiser (STYLE 1).

*Steps.* Calls are placed on steps by the pipeline's scheduler, never by the timestep's
value: ``set_timesteps`` begins a run, ``step`` ends a step, and the calls of one denoiser
within a step are its *streams* (the conditional and unconditional branch of a pipeline that
runs guidance as two calls; a second denoiser is its own) — [Note: drop-in steps] in
``asyncdiff/dropin/steps.py``. The network is fed exactly what the pipeline passes (``t``,
``t / 1000``, a per-frame vector); every way a pipeline could leave the timeline (a skipped
step, a scheduler stepped irregularly, a fed value that does not follow the scheduler) is an
error naming the pipeline, never a wrong image. ``warmup`` is clamped to T.

*Modes.* ``emulate``: one process runs every stage (:class:`asyncdiff.emulate.Emulator`).
``distributed``: under an initialised ``torch.distributed`` group (torchrun) of exactly
N−1+S ranks (N with ``stride_noise`` ``reuse`` or ``official``), every rank runs the same
pipeline call (same seed and inputs, SPMD); each runs its own stage
(:class:`DistributedExecutor`) and receives every ε, so every rank holds the same images.
See :func:`asyncdiff.dropin.session.distributed` for the plan and
:mod:`asyncdiff.dropin.weights` for what happens to the other stages' weights (``offload``).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from typing import Any, Literal

import torch
from torch import nn

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.dropin import arguments
from asyncdiff.dropin import session as sessions
from asyncdiff.dropin.arguments import Partitioning
from asyncdiff.dropin.denoisers import find_denoisers
from asyncdiff.dropin.lazy import CHECKPOINT_ATTR
from asyncdiff.dropin.call import (Call, answer, bind_call, half_call, output_form,
                                   structure_change, with_static)
from asyncdiff.dropin.session import Session
from asyncdiff.dropin.module_state import (refuse_stateful_hooks, refuse_wrapped_forward,
                                           state_key)
from asyncdiff.dropin.steps import FedTimesteps, StepClock
from asyncdiff.dropin.weights import Parked
from asyncdiff.schedule import Schedule
from partition import capture_or_fallback
from partition.capture import capture
from partition.contract import DenoiserContract
from partition.spec import nest

log = logging.getLogger(__name__)

def parallelize(pipe: Any, *, n: int | None = None, stride: int = 1, warmup: int = 1,
                cooldown: int = 0, sync: tuple[int, ...] = (), cfg_parallel: bool = False,
                cache_interval: int = 0, time_shift: bool = False,
                stride_noise: str = "fresh",
                strategy: str | None = None, cost_model: str = "flops",
                depth: int | None = 4, refine: int = 3, deepen: int = 0,
                target: float = 1.02, boundaries: list[str] | None = None,
                stages: list[list[str]] | None = None, split: str | None = None,
                plan: Any = None,
                mode: Literal["emulate", "distributed"] = "emulate",
                offload: Literal["cpu", "drop"] = "cpu",
                denoiser: str | tuple[str, ...] | None = None,
                verify: bool = True, backend: str = "auto",
                step_timeout_s: float | None = None) -> "Handle":
    """Run ``pipe``'s denoiser as an N-stage asynchronous pipeline until ``detach()``.

    ``n``, ``stride``, ``warmup``, ``cooldown``, ``sync``, ``time_shift``, ``stride_noise``,
    ``cfg_parallel``, ``cache_interval``: the schedule (:class:`asyncdiff.Schedule`;
    docs/design.md §2, [Note: staleness]). A run of fewer steps than W + C keeps the warm-up
    first and the sync steps that fall between the two. ``cfg_parallel``: each half of the
    denoiser's batch — [uncond, cond] when the pipeline runs guidance as one batched call —
    is its own pipeline (``asyncdiff/guidance.py``), on twice the ranks, ε halves swapped
    once per round (N = 1: plain CFG-parallel; emulate mode runs both halves in this
    process). ``cache_interval=K``: the step cache instead of the pipeline (one device,
    emulate mode, ``strategy="shell_core"``: ``asyncdiff/step_cache.py``).

    ``strategy`` (default ``balanced``), ``cost_model``, ``depth``, ``refine``, ``deepen``,
    ``target``: the partition (``partition.compile_model``, ``partition.PartitionRequest``;
    with ``cost_model="time"`` the split is refined on its stages' measured times, at most
    ``refine`` re-cuts, until the slowest stage is within ``target`` of the mean:
    ``partition/refine.py``). The split can also be given as the command line takes it:
    ``boundaries=[module, …]`` or ``stages=[[module, …], …]`` (``strategy="manual"``),
    ``split="paper_sd15_n3"`` (one of the paper's splits, with its N) or ``plan=`` a saved
    ``plan.json`` (its N and stages, rebuilt and verified, its ``plan_hash`` kept); a split or
    a plan sets the strategy, cost model and depth, and a strategy given with it must agree.
    ``verify``: check each compiled split against the denoiser on the first call's inputs
    (``partition/verify.py``; ``False`` skips it, the plan says so). ``backend``: ``auto``
    (torch.export, else the module backend), ``graph`` or ``module``.

    ``mode``: ``emulate`` or ``distributed`` (see the module docstring); ``offload``
    (distributed only): what happens to the weights this rank's stage does not use, ``cpu``
    (kept in host memory; ``detach()`` restores them exactly) or ``drop`` (freed;
    ``detach()`` then refuses). ``step_timeout_s`` (distributed): the longest a rank waits
    for a peer in the sampling loop before it names that peer and stops (default: derived
    from the plan's step, ``asyncdiff/distributed/limits.py``). ``denoiser``: the pipeline
    attribute holding the network (default: every one of ``unet``, ``transformer``,
    ``transformer_2``, … the pipeline holds; a name or a tuple of names).
    """
    part = arguments.partitioning(n, strategy, cost_model, depth, boundaries, stages, split,
                                  plan, verify, backend, target=target, deepen=deepen,
                                  refine=refine)
    schedule = Schedule(n=part.n, stride=stride, warmup=warmup, cooldown=cooldown, sync=sync,
                        time_shift=time_shift, stride_noise=stride_noise,
                        cache_interval=cache_interval, cfg_parallel=cfg_parallel)
    arguments.check(part, schedule, mode, offload, step_timeout_s)
    return Handle(pipe, find_denoisers(pipe, denoiser), schedule, part, mode, offload,
                  step_timeout_s)


class Handle:
    """A parallelized pipeline; :meth:`detach` (or leaving a ``with`` block) undoes it.

    ``schedule``: how the pipeline runs (:class:`asyncdiff.Schedule`; :meth:`set_timeline`
    changes it); ``partitioning``: how the denoiser is split; ``denoisers``: one
    :class:`_Denoiser` per parallelized module; ``sessions``: every compiled denoiser, by
    (attribute, call structure and shapes) (``.plan``, and ``.staged`` in emulate mode);
    ``executor``: the executor of the latest call's stream.
    """

    def __init__(self, pipe: Any, attrs: tuple[str, ...], schedule: Schedule,
                 partitioning: Partitioning, mode: str, offload: str,
                 step_timeout_s: float | None):
        self.pipe, self.schedule, self.partitioning = pipe, schedule, partitioning
        self.mode, self.offload, self.step_timeout_s = mode, offload, step_timeout_s
        self.clock = StepClock(getattr(pipe, "scheduler", None), type(pipe).__name__)
        self.denoisers: dict[str, _Denoiser] = {}
        try:
            for a in attrs:
                self.denoisers[a] = _Denoiser(self, a)
        except Exception:
            self.detach()
            raise
        self.streams: dict[tuple, _Stream] = {}  # (attr, j) or, CFG-parallel, (attr, j, g)
        self.executor: Any = None
        self.attached = True

    @property
    def attr(self) -> str:
        return next(iter(self.denoisers))

    @property
    def module(self) -> nn.Module:
        return self.denoisers[self.attr].module

    @property
    def sessions(self) -> dict[tuple, Session]:
        return {(a, k): s for a, d in self.denoisers.items() for k, s in d.sessions.items()}

    # ------------------------------------------------------------------ one call
    def _call(self, d: "_Denoiser", args: tuple, kwargs: dict) -> Any:
        self.clock.attach(getattr(self.pipe, "scheduler", None))
        call = bind_call(d.signature, args, kwargs)
        t = call.tensors[call.timestep]
        _, taus = self.clock.locate(t)
        step, j = self.clock.call(d.attr)
        if not self.schedule.cfg_parallel:
            stream = self._stream(d, (d.attr, j), step, taus, call)
            return answer(stream.denoise(call), stream.session.form)
        # CFG-parallel: each half of the batch is its own stream (its own pipeline)
        if self.mode == "distributed":
            import torch.distributed as dist
            group = self.schedule.place(dist.get_rank())[1]
            half = half_call(call, group)
            stream = self._stream(d, (d.attr, j, group), step, taus, half)
            eps = stream.denoise(half)  # its executor swaps the ε halves: the whole batch's
        else:
            halves = [half_call(call, g) for g in (0, 1)]
            streams = [self._stream(d, (d.attr, j, g), step, taus, halves[g]) for g in (0, 1)]
            eps = torch.cat([s.denoise(h) for s, h in zip(streams, halves)])
            stream = streams[1]
        return answer(eps, stream.session.form)

    def _stream(self, d: "_Denoiser", key: tuple, step: int, taus, call: Call) -> "_Stream":
        stream = self.streams.get(key)
        if stream is None or stream.run != self.clock.run:
            stream = self.streams[key] = _Stream(self, d, key, self.clock.run, step,
                                                 taus[step:], call)
        elif call.key != stream.call_key:
            change = structure_change(stream.call_key, stream.call_static, call, stream.k)
            raise RuntimeError(
                f"{stream.fed.owner}: {change}: the "
                f"pipeline changed which branch it calls at this position within a step (call "
                f"{key[1]} of pipe.{d.attr}) or the branch's input shapes; allowed: one "
                "structure per stream of a run (the same inputs, shapes, dtypes and non-tensor "
                "arguments on every step; their values may change from step to step)")
        elif step != stream.first + stream.k:
            raise RuntimeError(
                f"{type(self.pipe).__name__}: stream {key} (call {key[1]} of pipe.{d.attr} within "
                f"a step) is called at step {step} of the run after {stream.k} calls from step "
                f"{stream.first}: it skipped a step, and its asynchronous state would be "
                "stale by more than the schedule says (a pipeline that calls a branch only on "
                "some steps is not supported)")
        self.executor = stream.executor
        return stream

    # ------------------------------------------------------------------ schedule
    def set_timeline(self, *, stride: int | None = None, warmup: int | None = None,
                     time_shift: bool | None = None, stride_noise: str | None = None,
                     cooldown: int | None = None, sync: Any = None,
                     cache_interval: int | None = None) -> None:
        """Change the schedule from the next pipeline run on, keeping the captures and plans
        (they depend on ``n`` and the shapes only): a warm-up or stride sweep on one capture."""
        new = self.schedule.replace(stride=stride, warmup=warmup, cooldown=cooldown, sync=sync,
                                    time_shift=time_shift, stride_noise=stride_noise,
                                    cache_interval=cache_interval)
        arguments.check(self.partitioning, new, self.mode, self.offload, self.step_timeout_s)
        self.schedule = new
        self.streams.clear()  # the next call starts new streams

    # ------------------------------------------------------------------ undo
    def detach(self) -> None:
        """Restore the pipeline exactly: every denoiser's own ``forward``, the scheduler's own
        methods and, in distributed mode with ``offload='cpu'``, the weights parked in host
        memory (the same tensor objects, back on their devices). Idempotent. With
        ``offload='drop'`` the rest is restored and then a RuntimeError says the dropped
        weights cannot be."""
        if not getattr(self, "attached", True):
            return
        self.attached = False
        self.clock.detach()
        self.streams = {}
        self.executor = None
        errors = []
        for d in self.denoisers.values():
            try:
                d.detach()
            except RuntimeError as err:
                errors.append(err)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


# every module a live handle parallelizes (a wrapper the user set over its proxy hides it)
_LIVE: "weakref.WeakKeyDictionary[nn.Module, _Denoiser]" = weakref.WeakKeyDictionary()


class _Denoiser:
    """One parallelized module: its proxy forward, its compiled sessions, its parked weights."""

    def __init__(self, handle: Handle, attr: str):
        module = getattr(handle.pipe, attr)
        if module in _LIVE or \
                isinstance(getattr(module.__dict__.get("forward"), "__self__", None), _Denoiser):
            raise RuntimeError(f"pipe.{attr} is already parallelized; detach() that handle first")
        refuse_stateful_hooks(handle.pipe, attr, module)
        refuse_wrapped_forward(attr, module)
        h = handle
        self.handle, self.attr, self.module = handle, attr, module
        self.sessions: dict[tuple, Session] = {}
        self.original = module.forward  # the class's forward, or a hook's instance forward
        self.signature = inspect.signature(self.original)
        self._had_instance_forward = "forward" in module.__dict__
        self._instance_forward = module.__dict__.get("forward")
        self.parked = Parked(module, h.offload) if h.mode == "distributed" else None
        self.attached = True
        module.__dict__["forward"] = self.forward
        _LIVE[module] = self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.attached:  # detached below a wrapper the user set over it: pass through
            return self.original(*args, **kwargs)
        return self.handle._call(self, args, kwargs)

    def session(self, call: Call) -> Session:
        state = state_key(self.module)
        cached = self.sessions.get(call.key)
        if cached is not None and cached.state == state:
            return cached
        if cached is not None:  # the module changed since its capture: capture it again
            log.info("pipe.%s changed since it was captured (a scale, a flag, a module "
                     "added or removed): capturing it again", self.attr)
        h, part = self.handle, self.handle.partitioning
        if self.parked is not None and self.parked.entries:
            if self.parked.dropped:
                fix = "load the pipeline whole with offload='cpu'" if \
                    hasattr(self.module, CHECKPOINT_ATTR) else "use offload='cpu'"
                raise RuntimeError(f"new denoiser input shapes ({call.describe()}) need a new "
                                   "capture, but this rank dropped the other stages' weights "
                                   f"(offload='drop'); {fix}, or one shape")
            self.parked.restore()  # the capture traces the whole model
        # capture, plan and verify with the original forward (the proxy out of the way): the
        # verification calls the eager model, which must not come back here
        seen: list[Any] = []
        bound = with_static(self.original, call.static, seen.append)

        def runner(inputs):  # the module backend's stages run the original forward too
            return DenoiserContract().prediction(bound(**nest(inputs)))

        def capture_call():  # (None, why): the module backend (asked for, or no capture)
            return capture_or_fallback(
                lambda: capture(self.module, call.specs(), call.tensors), part.backend)

        with self._unpatched(bound):
            if hasattr(self.module, CHECKPOINT_ATTR):
                session = sessions.distributed_lazy(self.module, call, part, h.schedule.devices,
                                                    h.step_timeout_s, self._checkpoint())
            elif h.mode == "emulate":
                session = sessions.emulated(self.module, call, capture_call(), part, runner)
            else:
                session = sessions.distributed(self.module, call, capture_call, part,
                                               h.schedule.devices, h.step_timeout_s, runner)
        session.form = output_form(seen[-1])
        session.state = state
        self.sessions[call.key] = session
        if self.parked is not None:  # keep what any session's stage holds
            self.parked.release([t for s in self.sessions.values() for t in s.tensors()])
        return session

    def _checkpoint(self):
        """Where a meta denoiser's weights are (``asyncdiff/dropin/lazy.py``), after checking
        that the options allow loading it stage by stage."""
        h, where = self.handle, f"pipe.{self.attr} is on the meta device (loaded lazily)"
        o = h.partitioning
        checkpoint = getattr(self.module, CHECKPOINT_ATTR)
        for key, value, allowed in (("cost_model", o.cost_model, "flops"),
                                    ("backend", o.backend, "auto, graph"),
                                    ("mode", h.mode, "distributed"),
                                    ("offload", h.offload, "drop")):
            if value not in allowed.split(", "):
                raise ValueError(f"{where}: {key}={value!r}; allowed: {allowed} (each rank "
                                 "loads only its own stage's weights)")
        if o.plan is not None and o.plan.backend == "module":
            raise ValueError(f"{where}: a plan of the module backend; allowed: a graph-backend "
                             "plan (the module backend runs the denoiser to trace it)")
        return checkpoint

    @contextlib.contextmanager
    def _unpatched(self, forward):
        held = self.module.__dict__.get("forward")  # the proxy, or a wrapper set over it since
        self.module.__dict__["forward"] = forward
        try:
            yield
        finally:
            self.module.__dict__["forward"] = held

    def detach(self) -> None:
        """Restore the module's forward; a wrapper the user set over the proxy since stays
        (it is theirs), and the proxy below it passes every call to the original forward."""
        self.attached = False
        if _LIVE.get(self.module) is self:
            del _LIVE[self.module]
        if self.module.__dict__.get("forward") == self.forward:  # else a wrapper over it
            if self._had_instance_forward:
                self.module.__dict__["forward"] = self._instance_forward
            else:
                self.module.__dict__.pop("forward", None)
        self.sessions.clear()
        if self.parked is not None:
            self.parked.restore()


class _Stream:
    """One stream of one run ([Note: drop-in steps]): its timeline, the timesteps its network
    is fed, its executor."""

    def __init__(self, handle: Handle, d: _Denoiser, key: tuple, run: int,
                 first: int, taus: list[float], call: Call):
        sch = handle.schedule
        self.run, self.first, self.k = run, first, 0
        self.call_key, self.call_static = call.key, call.static  # its structure: no values
        self.session = d.session(call)
        self.fed = FedTimesteps(taus, f"{type(handle.pipe).__name__}, stream {key}")
        # the run fits the schedule: a run of fewer steps than W + C (or K) keeps the warm-up
        # (a step cache: step 0 full, the rest cached)
        timeline = sch.timeline(len(taus), clamp=True)
        self.executor = self.session.executor(timeline, self.fed,
                                              call.tensors[call.latent].device,
                                              groups=sch.groups)
        self.denoiser = PipelineDenoiser(self.executor)

    def denoise(self, call: Call) -> torch.Tensor:
        t = call.tensors[call.timestep]
        if self.k >= len(self.fed):
            raise RuntimeError(f"{self.fed.owner}: more calls than the run has steps "
                               f"({len(self.fed)})")
        self.fed.record(self.k, t)
        eps = self.denoiser(call.tensors[call.latent], t, self.k, call.cond)
        self.k += 1
        return eps
