"""Metrics of a run's time, work and traffic: pure functions of timings and the plan.
Image quality is ``experiments/quality.py`` ([Note: quality metrics]), learned metrics
``experiments/learned.py``.

MACs: a multiply-add counts 1 (the plan's ``macs`` = FLOPs / 2).
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence

from asyncdiff.timeline import stage_of_device

# --------------------------------------------------------------------------- time


def latency_summary(samples_s: Sequence[float]) -> dict[str, float]:
    """Median, mean, min, max and sample standard deviation of repeated latencies (s)."""
    if not samples_s:
        raise ValueError("latency_summary: no samples")
    xs = [float(x) for x in samples_s]
    return {"median_s": statistics.median(xs), "mean_s": statistics.fmean(xs),
            "min_s": min(xs), "max_s": max(xs),
            "std_s": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def speedup(baseline_s: float, parallel_s: float) -> float:
    """How many times faster the parallel run is than the baseline."""
    if parallel_s <= 0:
        raise ValueError(f"parallel_s={parallel_s}; allowed: > 0")
    return baseline_s / parallel_s


# --------------------------------------------------------------------------- work and bytes


def macs_per_device(plan, devices: int) -> list[int]:
    """MACs of one forward of the stage each of ``devices`` pipeline devices runs."""
    return [int(plan.stages[stage_of_device(d, plan.n)].macs) for d in range(devices)]


def bytes_sent(rows: Iterable[Mapping]) -> dict[int, int]:
    """Bytes each rank sent, from per-round timeline rows (``rank``, ``bytes_sent``)."""
    out: dict[int, int] = {}
    for r in rows:
        out[int(r["rank"])] = out.get(int(r["rank"]), 0) + int(r["bytes_sent"])
    return dict(sorted(out.items()))
