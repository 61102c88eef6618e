"""How long the runtime waits before it calls a worker failed: from the plan, not constants.

A full-size model on a CPU takes tens of seconds per forward (docs/benchmarks.md: SD 1.5,
~25 s at one thread); fixed limits sized for tiny models would kill such a run as "failed".
Each limit is configurable, and by default derived from the planned step time:

* ``step_s``: the longest one wait for a peer may take (the process group's timeout, so a
  hung or dead peer is noticed and named by whoever waits on it): 10× the estimated time of
  one sequential step, at least 30 s;
* ``run_s``: the whole run, a backstop for everything else: start-up plus every step at
  ``step_s``;
* ``startup_s``: what the run limit allows for start-up (processes, rendezvous, loading
  the stages).

The step estimate is the plan's measured whole forward (cost model ``time``), else its FLOPs
at a deliberately slow :data:`FLOOR_FLOPS_PER_S` (a single old CPU core), so that an
estimate errs towards waiting longer.
"""
from __future__ import annotations

from dataclasses import dataclass

from partition import Plan

FLOOR_FLOPS_PER_S = 2e9  # FLOPs (multiply-adds × 2) per second of one slow CPU thread
MIN_STEP_S = 30.0
STARTUP_S = 120.0
MARGIN = 10.0


@dataclass(frozen=True)
class Limits:
    """The waits of a run (module docstring); the defaults: a tiny model's."""

    step_s: float = MIN_STEP_S
    run_s: float = 600.0
    startup_s: float = STARTUP_S
    estimate_s: float = 0.0  # the estimated sequential step the values were derived from

    def describe(self) -> str:
        return (f"limits: {self.step_s:.0f} s per wait, {self.run_s:.0f} s per run "
                f"(step estimated at {self.estimate_s:.2f} s)")


def step_estimate_s(plan: Plan) -> float:
    """One sequential step, in seconds. A forward timed on the CPU with t threads is counted
    as t times longer (a worker may run it on one)."""
    m = plan.measured
    if m is not None and m.total_ms:
        return m.total_ms / 1e3 * (max(m.threads, 1) if m.device == "cpu" else 1)
    return (plan.step_flops or plan.total_flops) / FLOOR_FLOPS_PER_S


def derive(plan: Plan, steps: int, *, step_s: float | None = None, run_s: float | None = None,
           startup_s: float | None = None) -> Limits:
    """The limits for ``steps`` steps of ``plan``; a value given wins over its default."""
    return from_estimate(step_estimate_s(plan), steps, step_s=step_s, run_s=run_s,
                         startup_s=startup_s)


def from_estimate(estimate: float, steps: int, *, step_s: float | None = None,
                  run_s: float | None = None, startup_s: float | None = None) -> Limits:
    """The limits for ``steps`` steps of ``estimate`` seconds each (a plan's, or a step of
    the plain pipeline timed before the ranks start); a value given wins over its default."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}; allowed: an integer >= 1 (the run's T)")
    for key, value in (("step_timeout_s", step_s), ("run_timeout_s", run_s),
                       ("startup_timeout_s", startup_s)):
        if value is not None and not value > 0:
            raise ValueError(f"{key}={value!r}; allowed: a number of seconds > 0, or null "
                             "(derived from the plan)")
    step = step_s if step_s is not None else max(MIN_STEP_S, MARGIN * estimate)
    start = startup_s if startup_s is not None else STARTUP_S
    run = run_s if run_s is not None else start + steps * step
    return Limits(float(step), float(run), float(start), estimate)
