"""``run_ranks`` leaves nothing behind: every rank that reported ends on its own (none is
stopped while it tears down), a rank that draws a progress bar holds no semaphore a stop
could leak, and the queue that carried the results is released: the interpreter's resource
tracker finds nothing to clean up at exit, after a run and after a failed one."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from asyncdiff.distributed.launch import Task, WorkerError, run_ranks
import test_run_ranks as t

if __name__ == "__main__":
    print("done:", sorted(run_ranks(Task(t.with_a_bar, None, "gloo", 60.0), 2, 120.0)))
    try:
        run_ranks(Task(t.one_fails, None, "gloo", 60.0), 2, 120.0)
    except WorkerError as err:
        print("failed:", str(err).splitlines()[0])
"""


def _bar_and_slow_exit(rank: int) -> None:
    """A progress bar, as rank 0 of a sampling run draws one; rank 1 then takes a moment to
    exit (a finalizer that runs first at its exit, as a slow teardown would)."""
    import time
    from multiprocessing import util

    from tqdm import tqdm

    with tqdm(total=1, file=io.StringIO(), disable=False) as bar:
        bar.update(1)
    if rank == 1:
        util.Finalize(None, time.sleep, (1.5,), exitpriority=100)


def with_a_bar(rank: int, world: int, arg) -> tuple[None, int]:
    _bar_and_slow_exit(rank)
    return None, rank


def one_fails(rank: int, world: int, arg) -> tuple[None, int]:
    import time

    _bar_and_slow_exit(0)  # both hold a bar; rank 0 is stopped when rank 1 fails
    if rank == 1:
        raise RuntimeError("boom")
    time.sleep(60)
    return None, rank


@pytest.mark.timeout(200)
def test_no_semaphore_is_left_after_a_run_or_a_failed_one(tmp_path):
    path = tmp_path / "ranks.py"
    path.write_text(textwrap.dedent(SCRIPT.format(here=str(HERE))))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: [0, 1]" in done.stdout and "failed: rank 1 failed: RuntimeError: boom" \
        in done.stdout, done.stdout
    assert "leaked" not in done.stderr, done.stderr[-3000:]
