"""The timeline: which device runs which stage, fed which timestep, on which round's values.

Pure data, no torch: ``build_timeline`` turns (N, S, W, T, time shift, stride noise) into a
frozen table that the emulator and the distributed executor both walk, and ``format_grid``
prints it as a round × device grid. The rules are docs/design.md §2; they are stated once, in
[Note: staleness] below, and everything else refers to it (AsyncDiff, Chen et al. 2024, Eq. 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# [Note: staleness]
# ~~~~~~~~~~~~~~~~~
# The trunk is cut into stages E^1 … E^N; here they are 0-based, stage n = E^{n+1}, and stage
# N−1 emits ε. A *cross-stage value* is any tensor one stage produces and another consumes
# (main path, skip connections). Conditioning (timestep embedding, text projections, …) is
# replicated into each stage and recomputed from the timestep that stage is fed: never sent,
# never stale. Steps k = 0 … T−1 have scheduler timesteps τ_k; x_{k+1} = Φ(x_k, ε_k, τ_k).
#
# * Warm-up, k < W: one *round* per step. Device d runs stage d, in stage order, each on the
#   values its upstream stages produced in this same round (fresh), all fed τ_k; the last stage
#   gives ε_k. The last warm-up round publishes (seeds) every cross-stage value.
# * Parallel rounds, k ≥ W: steps are batched k … k+S−1 (the last batch may be shorter); one
#   round per batch. Every stage reads every cross-stage value from the round before (what was
#   communicated at the end of the previous batch: stale), never from its own round; the latent
#   it sees is x_k. Stages 0 … N−2 run once on devices 0 … N−2, fed τ of the batch's last step.
#   Stage N−1 runs once per step of the batch on devices N−1 … N−2+S, copy j fed τ_{k+j}, and
#   ε_{k+j} is copy j's output (stride_noise="fresh"). With S = 1 this is AsyncDiff Eq. 5,
#   ε_k = E^N(E^{N−1}(… E^1(x_{k−N+1}, τ_{k−N+1}) …, τ_{k−1}), τ_k), the chain cut at the
#   seeded warm-up values; a skip connection is one round stale per stage boundary it crosses.
# * stride_noise="reuse" (the official code at S = 2, docs/design.md §2): only copy 0 of stage
#   N−1 runs (N devices), and its output is ε for every step of the batch.
# * stride_noise="official" (the public code's S = 2 schedule for every W, docs/design.md §2):
#   "reuse", with batches aligned as that code aligns them: a batch starts at odd k ≥ W.
#   With an even W, step W is load-only: nothing runs, ε_W = ε_{W−1} (the last warm-up round
#   covers steps W−1 and W and its ε serves both), and the batches start at W+1 reading the
#   values that warm-up round published. With an odd W (every W the paper reports) or S = 1
#   it is "reuse" exactly. Strides other than 1 and 2 are refused (the public code has none).
#   N = 1 has no stage boundary and no load-only step (batches from W, as in "reuse").
# * The values a stage publishes at the end of a parallel round are those of its run fed the
#   batch's last step (stage N−1: copy len−1 in "fresh", copy 0 in "reuse"); this matters only
#   for splits where the last stage feeds another stage (e.g. the paper's SDXL "shell").
# * time_shift (AsyncDiff App. A): in parallel rounds every network input timestep index moves
#   back by one (clamped at 0); the scheduler still uses τ_k.
# * Cool-down, k ≥ T − C (``cooldown`` C): the last C steps run as warm-up steps do, one
#   sequential round per step on fresh values: the steps where stage inputs change most
#   between steps (docs/RESULTS.md) are computed exactly. W + C = T is the sequential sampler.
#   Official's load-only step exists only when a parallel round follows it.
# * Sync steps (``sync``, steps W ≤ k < T − C): the same sequential round in the middle of the
#   run, a refresh: every stage recomputed on fresh values, every value published, so the next
#   parallel round reads values no older than that step. Batches never span a sync step.
#   Warm-up and cool-down are the two ends of this one per-step schedule (sequential or
#   parallel). With stride_noise="official" at S = 2 a sync step must be even (batches keep
#   starting at odd k) and not the load-only step.
# * W = 0 with N > 1 is refused: nothing would seed the stale values of the first round.
# * Step cache (``build_cache_timeline``, interval K; DeepCache-style, one device): steps
#   k ≡ 0 (mod K) are sequential rounds (step 0 the warm-up, the others sync steps) that
#   publish every value; every other step is a *cached* round on the same device: only stage
#   N−1 runs, fed τ_k on x_k, reading every other stage's values from the last sequential
#   round (up to K−1 steps stale). With a shell/core split (``partition/strategies/shell.py``)
#   stage N−1 holds the network's outer blocks, so the outer blocks run every step and the
#   inner ones every K steps. K = 1 is the sequential sampler. Built and checked in
#   ``asyncdiff/step_cache.py``.
# * What travels between devices follows from these rules and the plan, and is derived in one
#   place: [Note: lowering] in ``asyncdiff/lowering/programs.py``. A sequential round is split
#   into phases there, one group of messages per segment, because its stages read values of
#   the same round, which must arrive before the stage that reads them computes; a parallel
#   round reads only the round before, so it computes first and posts one group.

STRIDE_NOISE: tuple[str, ...] = ("fresh", "reuse", "official")


def devices_needed(n: int, stride: int, stride_noise: str = "fresh") -> int:
    """Devices one pipeline runs on: N−1+S (``fresh``: a copy of the last stage per step of a
    batch), or N (``reuse``, ``official``: one copy; see [Note: staleness])."""
    return n - 1 + stride if stride_noise == "fresh" else n


def stage_of_device(device: int, n: int) -> int:
    """Device d < N−1 runs stage d; devices N−1 … run copies of stage N−1."""
    return min(device, n - 1)


@dataclass(frozen=True)
class Action:
    """What one device does in one round (see [Note: staleness]).

    ``round``, ``device``: its place in the grid. ``stage``: 0-based stage index (stage N−1
    emits ε). ``copy``: which copy of the stage; only stage N−1 has copies > 0, one per extra
    device in stride_noise="fresh", and copy j sits on device N−1+j. ``t_step``: the index k into
    the sampler's timesteps whose value τ_k the network is fed (every replicated conditioning
    node is computed from it). ``latent_step``: the k of the latent x_k this action sees wherever
    its stage reads the latent input (normally stage 0 only); always the round's first step.
    ``inputs_round``: the round whose published cross-stage values it reads: its own round in
    warm-up (fresh, produced upstream earlier in the same round), the previous round in a
    parallel round (stale); ``None`` when N = 1 (no stage boundary). ``eps_steps``: the steps
    whose ε is this action's output (empty for stages < N−1; several steps in "reuse" mode).
    ``publishes``: whether this action's cross-stage outputs are the ones communicated at the
    end of the round (exactly one run of each stage per round publishes).
    """

    round: int
    device: int
    stage: int
    copy: int
    t_step: int
    latent_step: int
    inputs_round: int | None
    eps_steps: tuple[int, ...]
    publishes: bool

    @property
    def fresh(self) -> bool:
        """True when the inputs come from upstream stages of the same round (warm-up only)."""
        return self.inputs_round == self.round


@dataclass(frozen=True)
class Round:
    """One warm-up step, or one parallel batch of up to S steps; ``actions`` sorted by device."""

    index: int
    kind: Literal["warmup", "parallel", "cooldown", "sync", "cached"]
    steps: tuple[int, ...]
    actions: tuple[Action, ...]

    @property
    def sequential(self) -> bool:
        """Warm-up, sync and cool-down rounds: every stage in order, on fresh values."""
        return self.kind not in ("parallel", "cached")

    def on(self, device: int) -> Action | None:
        """The action of ``device`` in this round, or None when it is idle."""
        return next((a for a in self.actions if a.device == device), None)

    def runs_of(self, stage: int) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.stage == stage)

    def publisher(self, stage: int) -> Action:
        """The run of ``stage`` whose cross-stage outputs are communicated after this round."""
        (action,) = (a for a in self.actions if a.stage == stage and a.publishes)
        return action

    def stage_inputs_round(self, stage: int) -> int | None:
        """The round whose published values ``stage`` reads in this round (this one, or r−1)."""
        return self.runs_of(stage)[0].inputs_round

    def eps_source(self, step: int) -> Action:
        """The action whose output is ε_step."""
        (action,) = (a for a in self.actions if step in a.eps_steps)
        return action

    @property
    def eps_steps(self) -> tuple[int, ...]:
        """The steps whose ε this round produces, in order (equal to ``steps``)."""
        return tuple(sorted(k for a in self.actions for k in a.eps_steps))


@dataclass(frozen=True)
class Timeline:
    """The whole schedule: ``rounds`` in execution order over ``devices`` devices."""

    n: int
    stride: int
    warmup: int
    steps: int
    time_shift: bool
    stride_noise: str
    devices: int
    rounds: tuple[Round, ...]
    cooldown: int = 0
    sync: tuple[int, ...] = ()  # sequential steps between warm-up and cool-down
    cache: int = 0  # step cache interval K (one device; ``build_cache_timeline``); 0: none

    def round_of(self, step: int) -> Round:
        """The round that produces ε_step."""
        return next(r for r in self.rounds if step in r.steps)

    def stage_inputs_round(self, round_index: int, stage: int) -> int | None:
        return self.rounds[round_index].stage_inputs_round(stage)

    def eps_steps(self, round_index: int) -> tuple[int, ...]:
        return self.rounds[round_index].eps_steps

    def device_of(self, stage: int, copy: int = 0) -> int:
        """Stage n < N−1 lives on device n; copy j of stage N−1 on device N−1+j."""
        return stage + copy

    def actions_of(self, device: int) -> tuple[Action, ...]:
        """Every action of ``device``, in round order (idle rounds left out)."""
        return tuple(a for r in self.rounds for a in r.actions if a.device == device)

    @property
    def parallel_rounds(self) -> tuple[Round, ...]:
        return tuple(r for r in self.rounds if not r.sequential)

    def __str__(self) -> str:
        return format_grid(self)


def check_int(key: str, value: object, low: int, high: int | None = None, why: str = "") -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= low and (high is None or value <= high):
            return value
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    raise ValueError(f"{key}={value!r}; allowed: {allowed}{why}")


def sequential_round(k: int, n: int, hold: bool = False, index: int | None = None,
                     kind: Literal["warmup", "cooldown", "sync"] = "warmup") -> Round:
    """Step k < W (or k ≥ T − C, round ``index``): stage s on device s, in order, fresh
    values, fed τ_k; everything published. ``hold`` (official, even W, k = W−1): its ε serves
    the load-only step k+1 too."""
    r = k if index is None else index
    steps = (k, k + 1) if hold else (k,)
    actions = tuple(
        Action(round=r, device=s, stage=s, copy=0, t_step=k, latent_step=k,
               inputs_round=r if n > 1 else None, eps_steps=steps if s == n - 1 else (),
               publishes=True)
        for s in range(n))
    return Round(index=r, kind=kind, steps=steps, actions=actions)


def _load_only_step(n: int, stride: int, warmup: int, steps: int, stride_noise: str) -> bool:
    """The public code's even-W step W: no compute, ε_W = ε_{W−1} ([Note: staleness])."""
    return (stride_noise == "official" and stride == 2 and n > 1 and warmup % 2 == 0
            and warmup < steps)


def _parallel_round(r: int, batch: tuple[int, ...], n: int, time_shift: bool,
                    stride_noise: str) -> Round:
    """One batch of steps k ≥ W; see [Note: staleness]."""
    def act(stage: int, copy: int, t_step: int, eps: tuple[int, ...], publishes: bool) -> Action:
        t_step = max(t_step - 1, 0) if time_shift else t_step
        return Action(round=r, device=stage + copy, stage=stage, copy=copy, t_step=t_step,
                      latent_step=batch[0], inputs_round=r - 1 if n > 1 else None,
                      eps_steps=eps, publishes=publishes)

    last = n - 1
    actions = [act(s, 0, batch[-1], (), True) for s in range(last)]
    if stride_noise == "fresh":
        actions += [act(last, j, k, (k,), j == len(batch) - 1) for j, k in enumerate(batch)]
    else:
        actions.append(act(last, 0, batch[0], batch, True))
    return Round(index=r, kind="parallel", steps=batch, actions=tuple(actions))


def build_timeline(n: int, stride: int, warmup: int, steps: int, time_shift: bool = False,
                   stride_noise: str = "fresh", cooldown: int = 0,
                   sync: tuple[int, ...] | list[int] = ()) -> Timeline:
    """The round × device schedule for N stages, stride S, W warm-up steps, T steps, C
    cool-down steps and the ``sync`` steps in between.

    Follows [Note: staleness] (docs/design.md §2; AsyncDiff Eq. 5, Sec. 3.2 "Stride Denoising").
    Devices: N−1+S with ``stride_noise="fresh"``, N with ``"reuse"`` or ``"official"``.
    Without time shift,
    N = 1 with S = 1, and W + C = T, are the sequential sampler. Bad arguments raise ValueError
    naming the key and the allowed values; W = 0 needs N = 1 (nothing else seeds the stale
    values).
    """
    n = check_int("n", n, 1)
    stride = check_int("stride", stride, 1)
    steps = check_int("steps", steps, 1)
    why = " when n > 1 (the last warm-up step seeds the stale cross-stage values)" if n > 1 else ""
    warmup = check_int("warmup", warmup, 1 if n > 1 else 0, steps, why)
    cooldown = check_int("cooldown", cooldown, 0, steps - warmup,
                          f" (warm-up + cool-down <= T = {steps}; W = {warmup})")
    if not isinstance(time_shift, bool):
        raise ValueError(f"time_shift={time_shift!r}; allowed: true, false")
    if stride_noise not in STRIDE_NOISE:
        raise ValueError(f"stride_noise={stride_noise!r}; allowed: {', '.join(STRIDE_NOISE)}")
    if stride_noise == "official" and stride > 2:
        raise ValueError(f"stride={stride} with stride_noise='official'; allowed: 1, 2 (the "
                         "public code's strides)")
    last = steps - cooldown  # the first cool-down step
    hold = _load_only_step(n, stride, warmup, last, stride_noise)
    sync = _check_sync(sync, warmup, last, hold, n, stride, stride_noise)
    rounds: list[Round] = [sequential_round(r, n, hold and r == warmup - 1) for r in range(warmup)]
    k0 = warmup + hold
    while k0 < last:
        if k0 in sync:
            rounds.append(sequential_round(k0, n, index=len(rounds), kind="sync"))
            k0 += 1
            continue
        k1 = min(k0 + stride, last, min((k for k in sync if k > k0), default=last))
        rounds.append(_parallel_round(len(rounds), tuple(range(k0, k1)), n, time_shift,
                                      stride_noise))
        k0 = k1
    for k in range(last, steps):
        rounds.append(sequential_round(k, n, index=len(rounds), kind="cooldown"))
    devices = devices_needed(n, stride, stride_noise)
    timeline = Timeline(n=n, stride=stride, warmup=warmup, steps=steps, time_shift=time_shift,
                        stride_noise=stride_noise, devices=devices, rounds=tuple(rounds),
                        cooldown=cooldown, sync=sync)
    validate(timeline)
    return timeline


def _check_sync(sync, warmup: int, last: int, hold: bool, n: int, stride: int,
                stride_noise: str) -> tuple[int, ...]:
    """The sync steps, sorted; each an integer W ≤ k < T − C (official: even, not the
    load-only step)."""
    try:
        steps = sorted(set(sync))
    except TypeError:
        steps = [sync]
    for k in steps:
        check_int("sync", k, warmup, last - 1,
                   f" (steps between warm-up and cool-down: W = {warmup}, T − C = {last})")
    aligned = stride_noise == "official" and stride == 2 and n > 1
    bad = [k for k in steps if aligned and (k % 2 == 1 or (hold and k == warmup))]
    if bad:
        other = f" other than the load-only step {warmup}" if hold else ""
        raise ValueError(f"sync={bad}; allowed: even steps{other} with stride_noise='official' "
                         "(its batches start at odd steps)")
    return tuple(steps)


def validate(tl: Timeline) -> None:
    """Check the structural contract of a timeline; raise ValueError saying what is broken.

    Every consumed value was published earlier (an upstream stage of the same warm-up round, or
    any stage of the round before a parallel round); one action per device per round; every
    stage runs, and exactly one of its runs publishes, in every round; every step gets exactly
    one ε, from stage N−1, in the round that covers it; rounds cover steps 0 … T−1 in order;
    no network input is fed a timestep later than its round's last step; device count is N−1+S
    ("fresh") or N ("reuse", "official"); only official's load-only step puts a second step
    in a warm-up round; the first W steps are warm-up rounds, the last C cool-down rounds,
    the sync steps sync rounds, and no parallel batch reaches into the cool-down or spans a
    sync step.
    """
    if tl.cache:
        raise ValueError("a step-cache timeline: asyncdiff.step_cache.validate checks it")

    def fail(r: int, msg: str) -> None:
        raise ValueError(f"timeline round {r}: {msg}")

    want = devices_needed(tl.n, tl.stride, tl.stride_noise)
    if tl.devices != want:
        raise ValueError(f"timeline: {tl.devices} devices, expected {want} for N={tl.n}, "
                         f"S={tl.stride}, stride_noise={tl.stride_noise}")
    covered = [k for rnd in tl.rounds for k in rnd.steps]
    if covered != list(range(tl.steps)):
        raise ValueError(f"timeline: rounds cover steps {covered}, expected 0 … {tl.steps - 1}")
    for i, rnd in enumerate(tl.rounds):
        if rnd.index != i:
            fail(i, f"index {rnd.index}")
        last = tl.steps - tl.cooldown
        hold = rnd.kind == "warmup" and i == tl.warmup - 1 and \
            _load_only_step(tl.n, tl.stride, tl.warmup, last, tl.stride_noise)
        size = 2 if hold else 1 if rnd.sequential else tl.stride
        kind = "warmup" if rnd.steps[0] < tl.warmup else "cooldown" if rnd.steps[0] >= last \
            else "sync" if rnd.steps[0] in tl.sync else "parallel"
        if not 1 <= len(rnd.steps) <= size or rnd.kind != kind or rnd.steps[-1] >= last > \
                rnd.steps[0] or (kind == "parallel" and set(rnd.steps) & set(tl.sync)):
            fail(i, f"{rnd.kind} round covers steps {rnd.steps} (W={tl.warmup}, S={tl.stride}, "
                    f"C={tl.cooldown})")
        devices = [a.device for a in rnd.actions]
        if devices != sorted(set(devices)) or not all(0 <= d < tl.devices for d in devices):
            fail(i, f"devices {devices}: need at most one action per device, sorted, "
                    f"each in 0 … {tl.devices - 1}")
        for s in range(tl.n):
            if sum(a.publishes for a in rnd.runs_of(s)) != 1:
                fail(i, f"stage {s} must run and publish exactly once")
        eps = sorted(k for a in rnd.actions for k in a.eps_steps)
        if eps != list(rnd.steps) or any(a.eps_steps and a.stage != tl.n - 1 for a in rnd.actions):
            fail(i, f"ε for steps {eps} (expected exactly {list(rnd.steps)}, "
                    f"from stage {tl.n - 1})")
        for a in rnd.actions:
            if not 0 <= a.stage < tl.n or (a.copy > 0 and a.stage != tl.n - 1):
                fail(i, f"device {a.device}: stage {a.stage} copy {a.copy}")
            if a.round != i or a.latent_step != rnd.steps[0]:
                fail(i, f"device {a.device}: round {a.round}, latent x_{a.latent_step}")
            if not 0 <= a.t_step <= rnd.steps[-1]:
                fail(i, f"device {a.device}: fed τ_{a.t_step}, beyond the round's steps")
            if tl.n == 1:
                if a.inputs_round is not None:
                    fail(i, f"device {a.device}: N=1 has no cross-stage values to read")
            elif rnd.sequential and a.inputs_round != i:
                fail(i, f"device {a.device}: warm-up stages read fresh values of their own round")
            elif not rnd.sequential and (a.inputs_round != i - 1 or i == 0):
                fail(i, f"device {a.device}: reads round {a.inputs_round}; a parallel round reads "
                        f"the values published by round {i - 1}")
        if (not rnd.sequential and tl.stride_noise == "official" and tl.stride == 2
                and tl.n > 1 and rnd.steps[0] % 2 == 0):
            fail(i, f"stride_noise=official: a batch starts at step {rnd.steps[0]}; the public "
                    "code starts them at odd steps")
        if rnd.sequential and [a.stage for a in rnd.actions] != list(range(tl.n)):
            fail(i, "a warm-up round runs stages 0 … N−1 once each, in order")


def _cell(a: Action, n: int) -> str:
    parts = [f"E{a.stage + 1}"]
    if a.stage == 0:
        parts.append(f"x{a.latent_step}")
    parts.append(f"τ{a.t_step}")
    if n > 1 and a.stage > 0:
        parts.append("fresh" if a.fresh else f"←r{a.inputs_round}")
    if a.eps_steps:
        parts.append("→ε" + ",".join(map(str, a.eps_steps)))
    return " ".join(parts)


def format_grid(tl: Timeline) -> str:
    """A printable round × device grid.

    A cell ``E2 τ5 ←r4 →ε5`` reads: stage E² (0-based stage 1), fed τ_5, reading the values
    published by round 4, its output is ε_5; ``x3`` is the latent stage E¹ sees, ``fresh`` a
    warm-up read from upstream in the same round, ``·`` an idle device. E¹ cells leave out
    the ``←r`` source: in a sequential split E¹ reads only the latent.
    """
    head = ["round", "steps"] + [f"dev{d}" for d in range(tl.devices)]
    rows = [head]
    for rnd in tl.rounds:
        cells = [" ; ".join(_cell(a, tl.n) for a in rnd.actions if a.device == d) or "·"
                 for d in range(tl.devices)]
        label = ",".join(map(str, rnd.steps))
        kind = {"warmup": "warm", "parallel": "par", "cooldown": "cool", "sync": "sync",
                "cached": "cache"}[rnd.kind]
        rows.append([f"r{rnd.index} {kind}", label] + cells)
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    title = (f"timeline N={tl.n} S={tl.stride} W={tl.warmup} T={tl.steps} "
             f"time_shift={tl.time_shift} stride_noise={tl.stride_noise}"
             + (f" cooldown={tl.cooldown}" if tl.cooldown else "")
             + (f" sync={list(tl.sync)}" if tl.sync and not tl.cache else "")
             + (f" cache_interval={tl.cache}" if tl.cache else ""))
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([title] + lines)
