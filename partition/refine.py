"""Stage-level truth: cut on the cost model, time the stages as they run, correct, cut again.

[Note: refinement] A plan's balance is a claim about the stages it builds, so it is measured on
them: whole segments run chained on the example inputs, exactly as the verification runs them
(``partition/verify.py``: that run is the verification, and it is timed). Each round

1. cuts with the current per-node weights (the strategy, e.g. balanced min–max);
2. builds those stages, verifies them bit for bit against the eager model and times them;
3. stops when the measured imbalance (slowest stage over the mean) is within ``target``, or
   is no better than the best round's, or the cuts are ones already measured (the corrected
   model chose them again: it agrees with the measurement);
4. otherwise scales each stage's trunk weights by measured / predicted (its replicated
   conditioning kept as the model has it) and goes round again, at most ``rounds`` times.

The round measured best is the plan; every round's cuts, predicted and measured stage times
go into the plan (``Measured.rounds``), so the balance a plan reports is one that was measured,
with the prediction beside it. A model whose stage times do not repeat shows it there: the
rounds disagree, the outcome says the refinement did not reach the target and gives the
largest spread between two timings of one stage it saw.

Why stage times and not only the per-node times the cost model has: those come from one pass
of the eager model and cannot see what the stages change (what runs next to what, the values a
stage receives instead of computing); the stage run is the thing itself, and it costs no
forward of its own, since the verification runs it anyway. One round costs one run of the
stages; the first round is the one every compile makes.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from partition.plan import Round
from partition.stages import StagedModel
from partition.strategies.base import Assignment
from partition.verify import Verified

# a stage's correction is clamped to this factor either way per round: one wild timing (a
# stage that shared its core with a burst of other work) cannot move the model further
CLAMP = 4.0


@dataclass
class Refined:
    """The round measured best, and what every round saw."""

    assignment: Assignment
    staged: StagedModel
    verified: Verified
    weights: np.ndarray          # the trunk weights the chosen split was cut with
    predicted_ms: tuple[float, ...]
    rounds: tuple[Round, ...]
    outcome: str

    @property
    def imbalance(self) -> float:
        return _imbalance(self.verified.stage_ms)


def cuts_of(a: Assignment) -> tuple[int, ...]:
    """The positions where the stage index changes (a contiguous split's cuts; for a stage
    with several segments, every change)."""
    so = a.stage_of
    return tuple(i for i in range(1, len(so)) if so[i] != so[i - 1])


def _imbalance(ms) -> float:
    mean = sum(ms) / len(ms)
    return max(ms) / mean if mean > 0 else 1.0


def refine(weights: np.ndarray, *, cut: Callable[[np.ndarray], Assignment],
           predict: Callable[[Assignment, np.ndarray], np.ndarray],
           build: Callable[[Assignment], StagedModel],
           measure: Callable[[StagedModel], Verified],
           rounds: int, target: float) -> Refined:
    """[Note: refinement]. ``weights``: per-node trunk weights in ms; ``cut(weights)``: the
    strategy; ``predict(assignment, weights)``: each stage's predicted ms (trunk and the
    conditioning it replicates); ``build``: the stages of an assignment; ``measure``: verify
    and time them (``stage_ms`` set); ``rounds``: re-cuts at most; ``target``: the measured
    imbalance that is good enough."""
    w = np.asarray(weights, dtype=np.float64).copy()
    history: list[Round] = []
    best: Refined | None = None
    outcome = ""
    for r in range(max(int(rounds), 0) + 1):
        a = cut(w)
        cuts = cuts_of(a)
        if any(h.cuts == cuts for h in history):
            outcome = (f"converged in {len(history)} round(s): the corrected cost model "
                       f"chose cuts already measured")
            break
        predicted = np.asarray(predict(a, w), dtype=np.float64)
        staged = build(a)
        v = measure(staged)
        if v.stage_ms is None:
            raise ValueError("refinement needs timed stages (cost_model=time)")
        measured = np.asarray(v.stage_ms, dtype=np.float64)
        history.append(Round(cuts, tuple(round(float(x), 4) for x in predicted),
                             tuple(float(x) for x in measured), v.spread))
        imb = _imbalance(measured)
        improved = best is None or imb < best.imbalance
        if improved:
            best = Refined(a, staged, v, w.copy(), history[-1].predicted_ms, (), "")
        if imb <= target:
            outcome = (f"measured imbalance {imb:.3f} <= target {target:g} in "
                       f"{len(history)} round(s)")
            break
        if not improved:
            outcome = (f"stopped after {len(history)} round(s): the measured imbalance "
                       f"{imb:.3f} is no better than round {_index(history, best) + 1}'s "
                       f"{best.imbalance:.3f}")
            break
        if r == rounds:
            outcome = f"{len(history)} round(s), the most allowed (partition.refine={rounds})"
            break
        w = correct(w, a, predicted, measured)
    assert best is not None
    if best.imbalance > target:
        spreads = [h.spread for h in history if h.spread is not None]
        disagree = max(abs(m / p - 1) for h in history
                       for m, p in zip(h.measured_ms, h.predicted_ms) if p > 0)
        outcome += (f"; did not reach the target {target:g}: best measured "
                    f"{best.imbalance:.3f} (round {_index(history, best) + 1}); stage times "
                    f"differed from the corrected model's by up to {disagree:.0%}"
                    + (f", two timings of one stage by up to {max(spreads):.0%}"
                       if spreads else ""))
    best.rounds, best.outcome = tuple(history), outcome
    return best


def _index(history: list[Round], best: Refined) -> int:
    cuts = cuts_of(best.assignment)
    return next(i for i, h in enumerate(history) if h.cuts == cuts)


def correct(w: np.ndarray, a: Assignment, predicted: np.ndarray,
            measured: np.ndarray) -> np.ndarray:
    """Scale each stage's trunk weights so that its prediction would have been its
    measurement (its replicated conditioning, ``predicted`` less its trunk, kept as it is)."""
    so = np.asarray(a.stage_of)
    out = w.copy()
    for s in range(a.n):
        own = so == s
        trunk = float(w[own].sum())
        if trunk <= 0 or not math.isfinite(measured[s]):
            continue
        other = float(predicted[s]) - trunk
        factor = max(float(measured[s]) - other, 0.0) / trunk
        out[own] = w[own] * min(max(factor, 1 / CLAMP), CLAMP)
    return out
