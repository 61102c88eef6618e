"""Progress bars are for a terminal: rank 0's bar over the sampling steps is drawn on a
terminal and writes nothing into a log file (tqdm's ``disable=None``)."""
from __future__ import annotations

import io
import sys

from asyncdiff.distributed import worker


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drawn(stderr) -> tuple[bool, str]:
    """Whether rank 0's bar draws on ``stderr`` (asked before close(), which disables it),
    and what it wrote there."""
    sys.stderr = stderr
    bar = worker._progress(4, 0)
    drawn = not bar.disable
    bar.update(4)
    bar.close()
    return drawn, stderr.getvalue()


def test_the_workers_bar_is_drawn_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # restored after the test
    assert _drawn(io.StringIO()) == (False, "")  # a log file: not a terminal
    drawn, text = _drawn(Terminal())
    assert drawn and "asyncdiff (rank 0)" in text and "/4" in text
