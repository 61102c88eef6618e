"""The run's schedule: every setting of how the pipeline runs, in one frozen value.

N, stride, warm-up, cool-down, sync steps, time shift, stride noise, the step cache's
interval, CFG-parallel and replicas: what the command line (``parallel.*``), the drop-in
(``asyncdiff.parallelize``), the executors and the study all take, built once and validated
once, by the timeline's own rules (``asyncdiff/timeline.py``, [Note: staleness]). What
depends on the number of steps T (W ≤ T, W + C ≤ T, a sync step before the cool-down, K ≤
T) is checked when a run's timeline is made: :meth:`Schedule.timeline`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from asyncdiff.lowering import place
from asyncdiff.step_cache import build_cache_timeline
from asyncdiff.timeline import (Timeline, build_timeline, check_int,
                                devices_needed)


@dataclass(frozen=True)
class Schedule:
    """How the pipeline runs (docs/design.md §2). ``devices``: one pipeline's (one guidance
    group's); ``world_size()``: every rank's. Bad values raise ValueError naming the key and
    the allowed values."""

    n: int
    stride: int = 1
    warmup: int = 1
    cooldown: int = 0
    sync: tuple[int, ...] = ()
    time_shift: bool = False
    stride_noise: str = "fresh"
    cache_interval: int = 0   # K > 0: the step cache on one device instead of the pipeline
    cfg_parallel: bool = False  # each guidance half its own group of devices
    replicas: int = 1         # independent pipelines (each its own noise and conditioning)

    def __post_init__(self):
        try:
            sync = tuple(sorted(set(self.sync)))
        except TypeError:
            raise ValueError(f"sync={self.sync!r}; allowed: a list of step indices") from None
        object.__setattr__(self, "sync", sync)
        for key in ("time_shift", "cfg_parallel"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r}; allowed: True, False")
        check_int("replicas", self.replicas, 1)
        check_int("cache_interval", self.cache_interval, 0, None, " (0: no step cache)")
        if self.cache_interval:
            self._check_cache()
            build_cache_timeline(self.n, self.cache_interval, self.cache_interval)
            return
        # the timeline's own rules, on the shortest run that holds every step named here
        check_int("warmup", self.warmup, 1 if self.n > 1 else 0, None, "" if self.n == 1 else
                  " when n > 1 (the last warm-up step seeds the stale cross-stage values)")
        check_int("cooldown", self.cooldown, 0)
        bad = [k for k in self.sync if not isinstance(k, int) or isinstance(k, bool)
               or k < self.warmup]
        if bad:
            raise ValueError(f"sync={bad}; allowed: step indices >= warmup={self.warmup} (the "
                             "steps between warm-up and cool-down run sequential too)")
        steps = max(self.warmup, 1, *(k + 1 for k in self.sync if isinstance(k, int))) + \
            self.stride + self.cooldown
        build_timeline(self.n, self.stride, self.warmup, steps, self.time_shift,
                       self.stride_noise, self.cooldown, self.sync)

    def _check_cache(self) -> None:
        """The step cache is its own schedule, on one device ([Note: staleness])."""
        plain = Schedule(n=2)
        for key in ("warmup", "stride", "cooldown", "sync", "time_shift", "stride_noise",
                    "cfg_parallel"):
            if getattr(self, key) != getattr(plain, key):
                raise ValueError(f"{key}={getattr(self, key)!r} with cache_interval="
                                 f"{self.cache_interval}; allowed: {getattr(plain, key)!r} "
                                 "(the step cache is its own schedule, on one device)")

    # ------------------------------------------------------------------ the world
    @property
    def devices(self) -> int:
        """Devices of one pipeline: N−1+S (``fresh``), N (``reuse``, ``official``), 1 (the
        step cache)."""
        if self.cache_interval:
            return 1
        return devices_needed(self.n, self.stride, self.stride_noise)

    @property
    def groups(self) -> int:
        """Guidance groups per replica: 2 with CFG-parallel (uncond, cond), else 1."""
        return 2 if self.cfg_parallel else 1

    def world_size(self, replicas: int | None = None) -> int:
        """Ranks of ``replicas`` (default: this schedule's) pipelines:
        replicas × groups × devices."""
        return (self.replicas if replicas is None else replicas) * self.groups * self.devices

    def place(self, rank: int) -> tuple[int, int, int]:
        """(replica, guidance group, device) of a global rank."""
        return place(rank, self.devices, self.groups)

    # ------------------------------------------------------------------ one run
    def timeline(self, steps: int, *, clamp: bool = False) -> Timeline:
        """The timeline of a run of ``steps`` steps. ``clamp``: fit a schedule longer than
        the run into it (the warm-up first, then the cool-down, the sync steps between; a
        step cache's interval at most T), as the drop-in does for each pipeline call."""
        if self.cache_interval:
            k = min(self.cache_interval, steps) if clamp else self.cache_interval
            return build_cache_timeline(self.n, k, steps)
        warmup, cooldown, sync = self.warmup, self.cooldown, self.sync
        if clamp:
            warmup = min(warmup, steps)
            cooldown = min(cooldown, steps - warmup)
            sync = tuple(k for k in sync if warmup <= k < steps - cooldown)
        return build_timeline(self.n, self.stride, warmup, steps, self.time_shift,
                              self.stride_noise, cooldown, sync)

    def replace(self, **changes) -> "Schedule":
        """This schedule with ``changes`` (validated again); ``None`` values are left out."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self) -> str:
        """``N=3 S=2 W=1``, with what else is set: for labels and logs."""
        if self.cache_interval:
            return f"step cache K={self.cache_interval} N={self.n}"
        parts = [f"N={self.n} S={self.stride} W={self.warmup}"]
        parts += [f"C={self.cooldown}"] if self.cooldown else []
        parts += [f"sync={list(self.sync)}"] if self.sync else []
        parts += ["time shift"] if self.time_shift else []
        parts += [self.stride_noise] if self.stride_noise != "fresh" else []
        parts += ["CFG-parallel"] if self.cfg_parallel else []
        parts += [f"{self.replicas} replicas"] if self.replicas > 1 else []
        return " ".join(parts)
