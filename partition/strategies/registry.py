"""Every strategy by name: a new strategy is one file and one line here (STYLE 3)."""
from __future__ import annotations

from partition.strategies.balanced import balanced, equal_blocks
from partition.strategies.base import Partitioner, RequestError
from partition.strategies.manual import manual
from partition.strategies.shell import shell_core

STRATEGIES: dict[str, Partitioner] = {
    "balanced": balanced,
    "equal_blocks": equal_blocks,
    "manual": manual,
    "shell_core": shell_core,
}


def get_strategy(name: str) -> Partitioner:
    if name not in STRATEGIES:
        raise RequestError(f"strategy={name!r}; allowed: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
