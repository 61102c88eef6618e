"""The one payload every strategy produces, and the protocol strategies follow."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # a type only: requests and assignments are plain data
    from partition.graph import TrunkGraph


class RequestError(ValueError):
    """A partition request this model cannot satisfy (too many stages for its blocks, a
    boundary it does not have, a memory cap no split fits): names the key and what is
    allowed. The command line reports it as bad input."""


@dataclass(frozen=True)
class PartitionRequest:
    """What a strategy is asked: N stages, at module boundaries of ``depth``.

    ``slack``: the communication-aware tie-break accepts any split whose slowest stage is
    within ``1 + slack`` of the best balance and picks the one sending the fewest bytes.
    ``memory_cap``: the most parameter bytes one stage may hold (None: unlimited).
    ``target``: the imbalance (slowest stage over the mean) that is good enough: where no cut
    at ``depth`` reaches it, the balanced strategy looks up to ``deepen`` module levels
    deeper, locally, around its cuts; the refinement (``refine`` rounds at most, with
    ``cost_model=time``: ``partition/refine.py``) stops once the measured stages reach it.
    """

    n: int
    depth: int | None = 4
    slack: float = 0.01
    memory_cap: int | None = None
    options: dict = field(default_factory=dict)
    target: float = 1.02
    deepen: int = 0
    refine: int = 3


@dataclass(frozen=True)
class Assignment:
    """Stage index of every trunk node, in trunk order. Stage ``n-1`` emits the output."""

    stage_of: tuple[int, ...]
    n: int
    strategy: str
    notes: tuple[str, ...] = ()

    def segments(self) -> list[tuple[int, int, int]]:
        """Maximal runs ``(stage, start, stop)`` of equal stage, in execution order."""
        out: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(self.stage_of) + 1):
            if i == len(self.stage_of) or self.stage_of[i] != self.stage_of[start]:
                out.append((self.stage_of[start], start, i))
                start = i
        return out

    @classmethod
    def from_cuts(cls, cuts: list[int], size: int, strategy: str, notes=()) -> "Assignment":
        """Contiguous stages: stage ``j`` holds positions ``cuts[j-1] .. cuts[j]-1``."""
        bounds = [0, *cuts, size]
        stage_of = [j for j in range(len(bounds) - 1) for _ in range(bounds[j], bounds[j + 1])]
        return cls(tuple(stage_of), len(bounds) - 1, strategy, tuple(notes))


class Partitioner(Protocol):
    """A strategy: a trunk graph and a request in, an assignment out."""

    def __call__(self, graph: TrunkGraph, request: PartitionRequest) -> Assignment: ...
