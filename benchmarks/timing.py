"""The one way the benchmarks time a piece of work: the median over repeats after untimed
warm-up calls, with CUDA events on a GPU (a host clock would time the kernel launches)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int, device: str = "cpu",
              warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)
