"""Suite-wide: GPU tests are marked ``gpu`` and skipped on machines without CUDA; the fast
tier (``make test``) fails a test not marked ``slow`` that runs longer than ``--fast-limit``
seconds, so a new slow test is marked before it slows everyone's loop (``tests/tiers.py``)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_addoption(parser):
    parser.addoption("--fast-limit", type=float, default=None, metavar="SECONDS",
                     help="fail a test not marked slow whose call takes longer (the fast tier)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    limit = item.config.getoption("--fast-limit")
    if (limit and report.when == "call" and report.passed and "slow" not in item.keywords
            and call.duration > limit):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {call.duration:.1f} s in the fast tier "
                           f"(--fast-limit {limit:g} s): mark it @pytest.mark.slow (the full "
                           "tier, make test-all), or make it faster")
