"""The test tiers: ``make test`` runs what is not marked ``slow`` (minutes, at least one case
of every equivalence claim), ``make test-all`` everything. Each zoo model is built, captured
and compiled once per test process; the UNets of these models take 15-45 s each over a file
of tests, so their cases are in the full tier (the SD 1.5 UNet and every transformer stay in
the fast one)."""
from __future__ import annotations

import pytest

SLOW_MODELS = frozenset({"svd", "animatediff", "sdxl", "sd21", "digits", "patches"})


def model_params(names) -> list:
    """``names`` for ``parametrize``, the slow models marked ``slow``."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n for n in names]
