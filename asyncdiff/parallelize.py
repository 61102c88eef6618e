"""The diffusers drop-in: ``asyncdiff.parallelize(pipe, n=…)`` on an unmodified pipeline.

    handle = asyncdiff.parallelize(pipe, n=2, stride=1, warmup=1)
    image = pipe(prompt_embeds=…, num_inference_steps=50).images[0]
    handle.detach()  # the pipeline is exactly as before

The denoiser (``pipe.unet`` or ``pipe.transformer``) stays the same module object (the
pipeline reads its ``config``, ``dtype``, ``device``); only its *instance* ``forward`` is
replaced by a proxy. On the first call of a given shape the proxy captures the call with the
original forward, compiles it into N stages and answers every call with the ε of the
asynchronous pipeline (AsyncDiff, Chen et al. 2024; the rules are [Note: staleness] in
``asyncdiff/timeline.py``), in the form the model answers (a tuple for ``return_dict=False``,
else its output dataclass). The pipeline's own loop, guidance and scheduler run unchanged:
the async runtime enters only as the denoiser (STYLE 1).

*Steps.* A pipeline run is recognised by its scheduler: ``pipe.scheduler.timesteps`` is a
new tensor after every ``set_timesteps``. The run's τ_0 … τ_{T−1} are those timesteps from
the first call's timestep on (img2img starts part-way); call k must be fed τ_k, which is
checked on every call (a pipeline that feeds the network another value, e.g. t/1000, is
refused rather than run on the wrong timeline). A call with τ_0 in the middle of a run starts
a new one (an interrupted loop), as does a call after the T-th. ``warmup`` is clamped to T.

*Modes.* ``emulate``: one process runs every stage (:class:`asyncdiff.emulate.Emulator`).
``distributed``: under an initialised ``torch.distributed`` group (torchrun) of exactly
N−1+S ranks (N with ``stride_noise="reuse"``), every rank runs the same pipeline call (same
seed and inputs, SPMD); each runs its own stage (:class:`DistributedExecutor`) and receives
every ε, so every rank holds the same images. See :func:`asyncdiff.dropin.session.distributed`
for the plan and :mod:`asyncdiff.dropin.weights` for what happens to the other stages'
weights (``offload``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Literal

import torch
from torch import nn

from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.dropin import session as sessions
from asyncdiff.dropin.call import Call, answer, bind_call, output_form, with_static
from asyncdiff.dropin.session import Options, Session
from asyncdiff.dropin.weights import OFFLOAD, Parked
from asyncdiff.timeline import build_timeline, devices_needed
from partition import STRATEGIES
from partition.api import BACKENDS
from asyncdiff.dist.sharing import try_capture
from partition.capture import capture
from partition.contract import DenoiserContract
from partition.spec import nest
from partition.cost import COST_MODELS

MODES: tuple[str, ...] = ("emulate", "distributed")
DENOISERS: tuple[str, ...] = ("unet", "transformer")


def parallelize(pipe: Any, *, n: int, stride: int = 1, warmup: int = 1,
                time_shift: bool = False, stride_noise: str = "fresh",
                strategy: str = "balanced", cost_model: str = "flops", depth: int | None = 4,
                mode: Literal["emulate", "distributed"] = "emulate",
                offload: Literal["cpu", "drop"] = "cpu", denoiser: str | None = None,
                verify: bool = True, backend: str = "auto") -> "Handle":
    """Run ``pipe``'s denoiser as an N-stage asynchronous pipeline until ``detach()``.

    ``n``, ``stride``, ``warmup``, ``time_shift``, ``stride_noise``: the timeline
    (DESIGN.md §2, [Note: staleness]); ``strategy``, ``cost_model``, ``depth``: the partition
    (``partition.compile_model``); ``mode``: ``emulate`` or ``distributed`` (see the module
    docstring); ``offload`` (distributed only): what happens to the weights this rank's stage
    does not use, ``cpu`` (kept in host memory; ``detach()`` restores them exactly) or
    ``drop`` (freed; ``detach()`` then refuses). ``denoiser``: the pipeline attribute holding
    the network (default: the first of ``unet``, ``transformer``). ``verify``: check each
    compiled split against the denoiser on the first call's inputs (``partition/verify.py``;
    ``False`` skips it, the plan says so). ``backend``: ``auto`` (torch.export, else the
    module backend), ``graph`` or ``module``.
    """
    opts = Options(n, stride, warmup, time_shift, stride_noise, strategy, cost_model, depth,
                   mode, offload, verify, backend)
    _check_options(opts)
    return Handle(pipe, _find_denoiser(pipe, denoiser), opts)


def _check_options(o: Options) -> None:
    """Bad arguments raise ValueError naming the key and the allowed values (STYLE 8)."""
    build_timeline(o.n, o.stride, o.warmup, max(o.warmup, 1) + o.stride, o.time_shift,
                   o.stride_noise)
    for key, value, allowed in (("strategy", o.strategy, tuple(STRATEGIES)),
                                ("cost_model", o.cost_model, tuple(COST_MODELS)),
                                ("mode", o.mode, MODES), ("offload", o.offload, OFFLOAD),
                                ("backend", o.backend, BACKENDS)):
        if value not in allowed:
            raise ValueError(f"{key}={value!r}; allowed: {', '.join(allowed)}")
    if o.mode == "distributed":
        _check_group(o)


def _find_denoiser(pipe: Any, attr: str | None) -> str:
    names = (attr,) if attr else DENOISERS
    for name in names:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise ValueError(f"{type(pipe).__name__} has no denoiser module at "
                     f"{' or '.join('pipe.' + n for n in names)}; pass denoiser='<attribute>'")


def _check_group(opts: Options) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mode='distributed' needs an initialised torch.distributed process "
                           "group (run under torchrun and call "
                           "torch.distributed.init_process_group() first)")
    devices = devices_needed(opts.n, opts.stride, opts.stride_noise)
    if dist.get_world_size() != devices:
        raise ValueError(f"world size {dist.get_world_size()}; n={opts.n}, stride={opts.stride}, "
                         f"stride_noise={opts.stride_noise} need exactly {devices} ranks")


class Handle:
    """A parallelized pipeline; :meth:`detach` (or leaving a ``with`` block) undoes it.

    ``sessions``: one compiled denoiser per call shape (``.plan``, and ``.staged`` in emulate
    mode); ``executor``: the executor of the latest run (its ``stats`` in distributed mode).
    """

    def __init__(self, pipe: Any, attr: str, opts: Options):
        module = getattr(pipe, attr)
        if isinstance(getattr(module.__dict__.get("forward"), "__self__", None), Handle):
            raise RuntimeError(f"pipe.{attr} is already parallelized; detach() that handle first")
        self.pipe, self.attr, self.module, self.options = pipe, attr, module, opts
        self.sessions: dict[tuple, Session] = {}
        self.executor: Any = None
        self._original = module.forward  # the class's forward, or a hook's instance forward
        self._signature = inspect.signature(self._original)
        self._had_instance_forward = "forward" in module.__dict__
        self._instance_forward = module.__dict__.get("forward")
        self._parked = Parked(module, opts.offload) if opts.mode == "distributed" else None
        self._run: dict[str, Any] = {"source": None, "timesteps": [], "k": 0}
        self._denoiser: PipelineDenoiser | None = None
        self._run_key: tuple | None = None
        self.attached = True
        module.__dict__["forward"] = self._forward

    # ------------------------------------------------------------------ the proxy
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        call = bind_call(self._signature, args, kwargs)
        t = call.tensors[call.timestep]
        k = self._step(t)
        if k == 0:
            session = self._session(call)
            steps = len(self._run["timesteps"])
            timeline = build_timeline(self.options.n, self.options.stride,
                                      min(self.options.warmup, steps), steps,
                                      self.options.time_shift, self.options.stride_noise)
            self.executor = session.executor(timeline, self._run["timesteps"],
                                             call.tensors[call.latent].device)
            self._denoiser, self._run_key = PipelineDenoiser(self.executor), call.key
        elif call.key != self._run_key:
            raise RuntimeError(f"denoiser call {k} of a run changed its inputs to "
                               f"{call.describe()} (or its non-tensor arguments); one run has "
                               f"one shape")
        eps = self._denoiser(call.tensors[call.latent], t, k, call.cond)
        return answer(eps, self.sessions[self._run_key].form)

    def _step(self, t: torch.Tensor) -> int:
        """Index k of this call in the current run, starting a new run where one begins."""
        scheduler = getattr(self.pipe, "scheduler", None)
        source = getattr(scheduler, "timesteps", None)
        if not isinstance(source, torch.Tensor):
            raise RuntimeError("the drop-in reads the run's timesteps from "
                               "pipe.scheduler.timesteps, which is not set (call the pipeline, "
                               "or scheduler.set_timesteps, first)")
        run = self._run
        new = (source is not run["source"] or run["k"] >= len(run["timesteps"])
               or (run["k"] > 0 and not _fed(t, run["timesteps"][run["k"]])
                   and _fed(t, run["timesteps"][0])))
        if new:
            values = [float(v) for v in source.reshape(-1)]
            start = next((i for i, v in enumerate(values) if _fed(t, v)), None)
            if start is None:
                raise RuntimeError(f"the pipeline fed the denoiser timestep {_show(t)}, which is "
                                   f"not in pipe.scheduler.timesteps {values}; the drop-in needs "
                                   f"the network fed the scheduler's timesteps")
            run.update(source=source, timesteps=values[start:], k=0)
            self._denoiser = None
        k = run["k"]
        if not _fed(t, run["timesteps"][k]):
            raise RuntimeError(f"denoiser call {k} of the run was fed timestep {_show(t)}, but "
                               f"the scheduler's τ_{k} is {run['timesteps'][k]}: the drop-in "
                               f"needs one call per scheduler timestep, fed that timestep")
        run["k"] = k + 1
        return k

    # ------------------------------------------------------------------ compiling
    def _session(self, call: Call) -> Session:
        if call.key in self.sessions:
            return self.sessions[call.key]
        if self._parked is not None and self._parked.entries:
            if self._parked.dropped:
                raise RuntimeError(f"new denoiser input shapes ({call.describe()}) need a new "
                                   "capture, but this rank dropped the other stages' weights "
                                   "(offload='drop'); use offload='cpu', or one shape")
            self._parked.restore()  # the capture traces the whole model
        # capture, plan and verify with the original forward (the proxy out of the way): the
        # verification calls the eager model, which must not come back here
        seen: list[Any] = []
        bound = with_static(self._original, call.static, seen.append)

        def runner(inputs):  # the module backend's stages run the original forward too
            return DenoiserContract().prediction(bound(**nest(inputs)))

        def capture_call():  # None: the module backend (asked for, or capture failed)
            if self.options.backend == "module":
                return None
            return try_capture(lambda: capture(self.module, call.specs(), call.tensors),
                               self.options.backend)

        with self._unpatched(bound):
            if self.options.mode == "emulate":
                session = sessions.emulated(self.module, call, capture_call(), self.options,
                                            runner)
            else:
                session = sessions.distributed(self.module, call, capture_call, self.options,
                                               runner)
        session.form = output_form(seen[-1])
        self.sessions[call.key] = session
        if self._parked is not None:  # keep what any session's stage holds
            self._parked.release([t for s in self.sessions.values() for t in s.tensors()])
        return session

    @contextlib.contextmanager
    def _unpatched(self, forward):
        self.module.__dict__["forward"] = forward
        try:
            yield
        finally:
            self.module.__dict__["forward"] = self._forward

    def set_timeline(self, *, stride: int | None = None, warmup: int | None = None,
                     time_shift: bool | None = None, stride_noise: str | None = None) -> None:
        """Change the schedule from the next pipeline run on, keeping the captures and plans
        (they depend on ``n`` and the shapes only): a warm-up or stride sweep on one capture."""
        o = self.options
        new = dataclasses.replace(
            o, stride=o.stride if stride is None else stride,
            warmup=o.warmup if warmup is None else warmup,
            time_shift=o.time_shift if time_shift is None else time_shift,
            stride_noise=o.stride_noise if stride_noise is None else stride_noise)
        _check_options(new)
        self.options = new
        self._run["k"] = len(self._run["timesteps"])  # the next call starts a new run

    # ------------------------------------------------------------------ undo
    def detach(self) -> None:
        """Restore the pipeline exactly: the denoiser's own ``forward`` and, in distributed mode
        with ``offload='cpu'``, the weights parked in host memory (the same tensor objects,
        back on their devices). Idempotent. With ``offload='drop'`` the forward is restored and
        then a RuntimeError says the dropped weights cannot be."""
        if not self.attached:
            return
        self.attached = False
        if self._had_instance_forward:
            self.module.__dict__["forward"] = self._instance_forward
        else:
            self.module.__dict__.pop("forward", None)
        self.sessions.clear()
        self.executor = self._denoiser = None
        if self._parked is not None:
            self._parked.restore()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def _fed(t: torch.Tensor, value: float) -> bool:
    """Whether every entry of the call's timestep is τ (pipelines expand t to the batch)."""
    return bool(torch.all(t.detach().to("cpu", torch.float64) == value))


def _show(t: torch.Tensor) -> str:
    flat = t.detach().reshape(-1)
    return f"{float(flat[0])}" if flat.numel() and bool(torch.all(flat == flat[0])) \
        else str(flat.tolist())
