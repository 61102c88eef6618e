"""Thread count as a scoped setting: library code changes torch's process-wide intra-op
thread count only for the work it does, and puts it back (results of oneDNN kernels depend
on it, so timing and verification pin it; the caller's setting is not theirs to keep)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[int]:
    """``torch.set_num_threads(n)`` for the block (``None``: left as it is), then restored;
    yields the count in force."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
