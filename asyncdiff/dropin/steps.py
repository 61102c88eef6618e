"""Which step of which run a denoiser call belongs to: by order, read from the scheduler.

[Note: drop-in steps]
~~~~~~~~~~~~~~~~~~~~~
A pipeline's loop is ``for t in timesteps: ε = denoiser(x, fed(t), …); x = scheduler.step(…)``.
The drop-in never guesses a step from the timestep's *value* (a pipeline may feed t / 1000,
log σ / 4, a per-frame vector): it watches the scheduler.

* only the scheduler the pipeline holds is consulted (its own methods, by its class): the
  drop-in never lists or makes another of diffusers' schedulers, so one whose backend is not
  installed (``DPMSolverSDEScheduler`` without ``torchsde``) is never imported.
* ``scheduler.set_timesteps`` begins a *run*; ``scheduler.set_begin_index(i)`` (img2img with
  ``strength`` or ``denoising_start``) says the run starts at entry ``i`` of
  ``scheduler.timesteps``; without it the run starts at entry 0, or, when the first call is
  fed exactly one of the scheduler's timesteps, at that entry.
* every ``scheduler.step`` call ends a step. A second-order scheduler (Heun) lists each
  timestep twice and is stepped once per entry: one entry is one step here.
* the calls between two ``step`` calls belong to the current step, in order: call ``j`` of a
  denoiser within a step is *stream* ``(denoiser, j)`` — the conditional and the
  unconditional branch of a pipeline that runs guidance as separate calls (Wan, true CFG,
  perturbed-attention or skip-layer guidance) are two streams; a second denoiser
  (Wan 2.2's ``transformer_2``) is its own. Each stream has its own asynchronous state, so
  staleness never crosses from one branch or one denoiser to another. A stream's steps are
  the run's steps on which it is called, counted from its first call. A stream is known by
  its call order and its first call's structure (inputs, shapes, dtypes, non-tensor
  arguments): a call of another structure at its position is a changed branch, refused;
  values are never compared, so conditioning that varies across steps (a ControlNet window,
  a guidance schedule) is each step's own conditioning.
* the network is always fed exactly what the pipeline passed. Where the schedule needs the
  value of a step not called yet (a stride copy of the last stage, S >= 2 with
  ``stride_noise=fresh``), it is predicted from the scheduler's timestep by the transform
  that reproduces every value fed so far bit for bit (none, ``t / c``, ``t · c`` or
  ``1 - t / c``); with no
  such transform it is an error naming the pipeline, and a prediction the pipeline later
  contradicts is an error too — never a wrong image.
"""
from __future__ import annotations

import functools
import types
from typing import Any

import torch


HOOKED = ("set_timesteps", "set_begin_index", "step")
# more denoiser calls than this between two scheduler.step calls: not a pipeline loop the
# drop-in can map (guidance branches are 2 or 3 calls; a loop without scheduler.step is many)
MAX_CALLS_PER_STEP = 8


class StepClock:
    """Patches a scheduler's ``set_timesteps``, ``set_begin_index`` and ``step`` (instance
    attributes, removed by :meth:`detach`) to count runs and steps.

    Each patch is a method bound to the scheduler it was made for. A copy of the scheduler
    (LTX 2's audio scheduler is ``copy.deepcopy(pipe.scheduler)``) carries the patch along,
    bound to the copy: on anything but the scheduler it was made for, and once the clock is
    detached, it only calls the scheduler's own method. A patch found copied onto the
    scheduler being attached is removed first; another clock's live patch is kept and called
    (two handles on one pipeline), and detaching restores only what is still this clock's."""

    def __init__(self, scheduler: Any, owner: str = "pipeline"):
        self.owner = owner     # for messages: the pipeline class
        self.scheduler = None
        self.run = 0           # runs begun (set_timesteps calls)
        self.steps_done = 0    # step calls in this run
        self.begin: int | None = None
        self.start: int | None = None  # the run's first entry of scheduler.timesteps
        self.calls: dict[str, int] = {}  # denoiser -> calls in the current step
        self._saved: dict[str, tuple[Any, Any]] = {}  # name -> (what it replaced, the patch)
        self.attach(scheduler)

    # ------------------------------------------------------------------ patching
    def attach(self, scheduler: Any) -> None:
        if scheduler is self.scheduler:
            return
        self.detach()
        self.scheduler = scheduler
        if scheduler is None:
            return
        for name in HOOKED:
            if not callable(getattr(scheduler, name, None)):
                continue
            current = scheduler.__dict__.get(name)
            if _copied_patch(current, scheduler):
                del scheduler.__dict__[name]
                current = None
            patch = types.MethodType(self._patch(name, scheduler, current), scheduler)
            self._saved[name] = (current, patch)
            scheduler.__dict__[name] = patch
        if getattr(scheduler, "num_inference_steps", None) is not None:
            self._begin_run()  # timesteps already set: calls before the next set_timesteps

    def detach(self) -> None:
        if self.scheduler is None:
            return
        sched, self.scheduler = self.scheduler, None  # from here on every patch passes through
        for name, (replaced, patch) in self._saved.items():
            if sched.__dict__.get(name) is not patch:
                continue  # patched over since: ours now passes through
            if replaced is None:
                del sched.__dict__[name]
            else:
                sched.__dict__[name] = replaced
        self._saved.clear()

    def _patch(self, name: str, made_for: Any, replaced: Any):
        """The patch of ``name``: the scheduler's own method (or what it replaced), then the
        clock's bookkeeping (before the call for set_begin_index, after it otherwise)."""
        own = getattr(type(made_for), name, None)
        clock = self

        def patch(sched, *args, **kwargs):
            if sched is not made_for or clock.scheduler is not made_for:
                return (replaced(*args, **kwargs) if replaced is not None and sched is made_for
                        else own(sched, *args, **kwargs))
            if name == "set_begin_index":
                clock.begin = int(args[0] if args else kwargs.get("begin_index", 0))
            out = replaced(*args, **kwargs) if replaced is not None else \
                own(sched, *args, **kwargs)
            if name == "set_timesteps":
                clock._begin_run()
            elif name == "step":
                clock.steps_done += 1
                clock.calls = {}
                clock._check_index()
            return out

        # pipelines read the scheduler's signature (``retrieve_timesteps`` asks whether
        # set_timesteps takes ``sigmas`` or ``timesteps``): the patch shows the original's
        functools.update_wrapper(patch, own if own is not None else replaced)
        patch.made_for = made_for
        return patch

    def _begin_run(self) -> None:
        self.run += 1
        self.steps_done, self.begin, self.start = 0, None, None
        self.calls = {}

    def _check_index(self) -> None:
        """The scheduler's own step counter (diffusers' ``step_index``) must agree with ours:
        a pipeline that steps the scheduler more or less often than it calls the network
        (or starts part-way in a way not seen) would put every later call on the wrong
        step."""
        index = getattr(self.scheduler, "step_index", None)
        if self.start is None or not isinstance(index, int):
            return
        if index != self.start + self.steps_done:
            raise RuntimeError(
                f"{self.owner}: the scheduler is at entry {index} of its timesteps after "
                f"{self.steps_done} step calls from entry {self.start}; the drop-in counts "
                "one scheduler.step per step and cannot place the denoiser's calls on the "
                "run's steps (a pipeline that steps its scheduler irregularly is not "
                "supported)")

    # ------------------------------------------------------------------ queries
    def timesteps(self) -> list[float]:
        ts = getattr(self.scheduler, "timesteps", None)
        if not isinstance(ts, torch.Tensor):
            raise RuntimeError(f"{self.owner}: the drop-in reads the run's steps from "
                               "pipe.scheduler, whose timesteps are not set (call the "
                               "pipeline, or scheduler.set_timesteps, first)")
        return [float(v) for v in ts.reshape(-1)]

    def locate(self, fed: torch.Tensor) -> tuple[int, list[float]]:
        """The run's entry ``start`` (fixed at its first call) and its timesteps from there."""
        if self.scheduler is None or "set_timesteps" not in self._saved \
                or "step" not in self._saved:
            raise RuntimeError(
                f"{self.owner}: the drop-in places each denoiser call on a step by the "
                "pipeline's scheduler (pipe.scheduler with set_timesteps and step), and "
                f"this pipeline has {_kind(self.scheduler)}")
        if self.run == 0:
            raise RuntimeError(f"{self.owner}: a denoiser call outside a pipeline run: the "
                               "drop-in maps calls to steps by the pipeline's scheduler "
                               "(set_timesteps, step); call the pipeline")
        values = self.timesteps()
        if self.start is None:
            begin = self.begin if self.begin is not None else \
                getattr(self.scheduler, "begin_index", None)
            if isinstance(begin, int):
                self.start = begin
            else:
                exact = [i for i, v in enumerate(values) if _all_equal(fed, v)]
                self.start = exact[0] if len(exact) >= 1 and len(set(values)) == len(values) \
                    else 0
        return self.start, values[self.start:]

    def call(self, denoiser: str) -> tuple[int, int]:
        """(step of the run, index of this call of ``denoiser`` within the step)."""
        j = self.calls.get(denoiser, 0)
        if j >= MAX_CALLS_PER_STEP:
            raise RuntimeError(
                f"{self.owner}: pipe.{denoiser} called {j + 1} times without a "
                "scheduler.step: the drop-in ends a step at each scheduler.step (a loop that "
                "steps a sampler of its own, e.g. k-diffusion's, is not supported)")
        self.calls[denoiser] = j + 1
        return self.steps_done, j


def _copied_patch(current: Any, scheduler: Any) -> bool:
    """A clock's patch that came along when ``scheduler`` was copied from a patched one."""
    made_for = getattr(getattr(current, "__func__", None), "made_for", None)
    return made_for is not None and (made_for is not scheduler
                                     or current.__self__ is not scheduler)


def _kind(scheduler: Any) -> str:
    return "none" if scheduler is None else f"a {type(scheduler).__name__} without them"


def _all_equal(t: torch.Tensor, value: float) -> bool:
    return bool(torch.all(t.detach().to("cpu", torch.float64) == value))


class FedTimesteps:
    """The timesteps one stream's network is fed, step by step (a sequence for the executors):
    what the pipeline passed, and for steps not called yet a prediction (module note)."""

    def __init__(self, taus: list[float], owner: str):
        self.taus = taus      # the scheduler's timesteps from this stream's first step
        self.owner = owner    # for messages: the pipeline class and the stream
        self.fed: list[torch.Tensor] = []
        self.predicted: dict[int, torch.Tensor] = {}
        self.relation: tuple[int, int] | None = None  # (first step, sign): see _check_follows

    def __len__(self) -> int:
        return len(self.taus)

    def record(self, k: int, value: torch.Tensor) -> None:
        if k != len(self.fed):
            raise RuntimeError(f"{self.owner}: call for step {k} after {len(self.fed)} steps")
        if k in self.predicted and not same_tensor(self.predicted[k], value):
            raise RuntimeError(
                f"{self.owner}: step {k} was run ahead of its call (a stride copy) with the "
                f"timestep {_show(self.predicted[k])}, but the pipeline fed {_show(value)}; "
                "its timestep transform cannot be predicted: use stride=1 or "
                "stride_noise='reuse'")
        self._check_follows(k, value)
        self.fed.append(value.detach().clone())

    def _check_follows(self, k: int, value: torch.Tensor) -> None:
        """What is fed must follow the scheduler: one value per timestep (an equal timestep
        is fed equally) and moving the same way. A pipeline feeding anything else (its own
        time grid, a per-call schedule) would be run on a timeline that is not its own."""
        for i, f in enumerate(self.fed):
            if self.taus[i] == self.taus[k] and not same_tensor(f, value):
                raise RuntimeError(
                    f"{self.owner}: steps {i} and {k} have the scheduler's timestep "
                    f"{self.taus[k]} but were fed {_show(f)} and {_show(value)}: the "
                    "network's timestep does not follow pipe.scheduler, which the drop-in "
                    "needs to place calls on steps")
        if not self.fed or value.shape != self.fed[-1].shape:
            return
        moved = float((value.double() - self.fed[-1].double()).mean())
        relation = _sign(moved * (self.taus[k] - self.taus[k - 1]))
        if relation == 0:
            return
        if self.relation is None:
            self.relation = (k, relation)  # t fed as is or scaled: +1; as 1 - t / c: -1
        elif relation != self.relation[1]:
            raise RuntimeError(
                f"{self.owner}: from step {k - 1} to {k} the scheduler's timestep goes "
                f"{self.taus[k - 1]} -> {self.taus[k]} and the network's "
                f"{_show(self.fed[-1])} -> {_show(value)}, the other way round from step "
                f"{self.relation[0]}: the network's timestep does not follow pipe.scheduler, "
                "which the drop-in needs to place calls on steps")

    def __getitem__(self, k: int) -> torch.Tensor:
        if k < len(self.fed):
            return self.fed[k]
        if k not in self.predicted:
            self.predicted[k] = self._predict(k)
        return self.predicted[k]

    def _predict(self, k: int) -> torch.Tensor:
        if not self.fed:
            raise RuntimeError(f"{self.owner}: step {k} needed before any call")
        like = self.fed[0]
        for transform in _TRANSFORMS:
            if all(same_tensor(transform(like, self.taus[i]), f) for i, f in enumerate(self.fed)):
                return transform(like, self.taus[k])
        raise RuntimeError(
            f"{self.owner}: the schedule needs the timestep of step {k} before the pipeline "
            f"feeds it (a stride copy), but the values fed so far ({_show(self.fed[0])} for the "
            f"scheduler's {self.taus[0]}, …) follow no transform the drop-in can reproduce "
            "exactly (none, t / c, t · c, 1 - t / c): use stride=1 or stride_noise='reuse'")


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _show(t: torch.Tensor) -> str:
    flat = t.detach().reshape(-1)
    return f"{float(flat[0])}" if flat.numel() and bool(torch.all(flat == flat[0])) \
        else str(flat.tolist())


def _identity(like: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.full_like(like, tau)


def _divided(c: float):
    def transform(like: torch.Tensor, tau: float) -> torch.Tensor:
        return torch.full(like.shape, tau, dtype=like.dtype, device=like.device) / c
    return transform


def _scaled(c: float):
    def transform(like: torch.Tensor, tau: float) -> torch.Tensor:
        return torch.full(like.shape, tau, dtype=like.dtype, device=like.device) * c
    return transform


def _complement(c: float):
    def transform(like: torch.Tensor, tau: float) -> torch.Tensor:
        return 1 - torch.full(like.shape, tau, dtype=like.dtype, device=like.device) / c
    return transform


# the transforms pipelines apply to the scheduler's timestep before the call (most: none;
# Flux, Chroma, Qwen-Image: t / 1000; some: t · 0.001; Lumina 2: 1 - t / 1000)
_TRANSFORMS = (_identity, _divided(1000.0), _scaled(0.001), _complement(1000.0))
