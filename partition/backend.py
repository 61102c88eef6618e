"""What a capture backend is, and the one policy for choosing between them.

Two backends feed the same Plan (docs/design.md §1): ``graph`` (torch.export; stages are cut
from the captured graph and hold only their own weights, ``partition/graph_backend.py``) and
``module`` (stages are sets of the network's own blocks, run eagerly,
``partition/modular``), for networks torch.export cannot capture. Each is one
:class:`Backend`; ``partition.api`` dispatches over them by name, as it does over
strategies. ``backend="auto"`` takes the graph backend and falls back to the module backend
when capture fails, saying so (:func:`capture_or_fallback`, used by every front end).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from partition.capture import Captured, CaptureError
from partition.plan import Plan
from partition.stages import StagedModel

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "graph", "module")


@dataclass
class Compiled:
    plan: Plan
    staged: StagedModel
    graph: Any  # TrunkGraph (graph backend) or partition.modular.BlockGraph (module backend)


class Backend(Protocol):
    """Makes a split, or rebuilds a saved plan's stages, for one kind of capture."""

    def compile(self, model, specs, inputs, request, *, strategy: str, cost_model: str,
                name: str, config_hash: str, repeats: int, threads: int | None,
                captured: Captured | None, costs, device: str | None, contract, verify: bool,
                runner, note: str) -> Compiled: ...

    def rebuild(self, model, specs, inputs, plan: Plan, *, captured: Captured | None,
                contract, threads: int | None, runner) -> tuple[Any, StagedModel]:
        """(graph, stages) of ``plan`` from a fresh capture or trace of the same model."""

    def verify(self, graph, staged: StagedModel, inputs, threads: int | None,
               name: str) -> str:
        """What comparing the stages with the eager model found (raises if they differ)."""


def capture_or_fallback(capture: Callable[[], Captured], backend: str
                        ) -> tuple[Captured | None, str]:
    """The one fallback policy: ``(captured, "")``; ``(None, "")`` for the module backend
    asked for; ``(None, why)`` when torch.export cannot capture and ``backend`` is ``auto``
    (``why`` goes into the plan's notes and the log, so a fallback is never silent); a
    :class:`CaptureError` for ``graph``."""
    if backend == "module":
        return None, ""
    try:
        return capture(), ""
    except CaptureError as err:
        if backend == "graph":
            raise
        why = f"module backend: torch.export could not capture the model ({err})"
        log.warning("%s", why.splitlines()[0])
        return None, why
