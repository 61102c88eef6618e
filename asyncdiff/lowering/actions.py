"""What a lowered schedule is made of: messages, the groups they are posted in, and the
compute steps between groups. Pure data (no torch), like the timeline it is lowered from.

A rank's program for one round is an ordered tuple of :class:`Compute` and :class:`Group`
items; the distributed executor interprets it item by item, posting each group as one
``torch.distributed.batch_isend_irecv`` and waiting for it before the next item
([Note: lowering] in ``asyncdiff/lowering/programs.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8,
                 "int32": 4}

Kind = Literal["values", "eps", "hoisted", "half"]


@dataclass(frozen=True)
class Payload:
    """One message's contents. ``values`` and ``hoisted``: the named tensors, flattened and
    packed in this order into one buffer of ``dtype``; ``eps``: the prediction of ``steps``
    (one tensor serves several steps in ``reuse`` mode); ``half``: this guidance group's ε
    half of ``steps``, swapped with the other group (CFG-parallel)."""

    kind: Kind
    dtype: str
    numel: int
    names: tuple[str, ...] = ()
    steps: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.numel * ELEMENT_BYTES[self.dtype]

    def describe(self) -> str:
        what = {"values": "v", "hoisted": "h", "eps": "ε", "half": "ε½"}[self.kind]
        if self.kind in ("eps", "half"):
            what += ",".join(map(str, self.steps))
        else:
            what += f"×{len(self.names)}"
        return f"{what} {_size(self.nbytes)}"


@dataclass(frozen=True)
class Comm:
    """One point-to-point operation of a rank: ``send`` to or ``recv`` from global rank
    ``peer``."""

    op: Literal["send", "recv"]
    peer: int
    payload: Payload

    def describe(self) -> str:
        return f"{'→' if self.op == 'send' else '←'}{self.peer} {self.payload.describe()}"


@dataclass(frozen=True)
class Group:
    """Operations posted together as one ``batch_isend_irecv`` and waited together.

    ``phase`` names where in the round it sits: ``hoist`` (the values computed once per run,
    before the round), ``fresh q`` (a sequential round: after global segment ``q``, the values
    later segments read), ``publish`` (the end of a round: what the next round reads, and ε),
    ``guidance`` (CFG-parallel: the ε halves)."""

    round: int
    phase: str
    ops: tuple[Comm, ...]

    @property
    def bytes_sent(self) -> int:
        return sum(c.payload.nbytes for c in self.ops if c.op == "send")


@dataclass(frozen=True)
class Compute:
    """Run this rank's segments that start at ``segments`` (trunk positions), in order:
    ``phase`` ``compute q`` in a sequential round (global segment q), ``compute`` in a
    parallel one (every segment of the stage)."""

    round: int
    segments: tuple[int, ...]
    phase: str = "compute"


Item = Union[Compute, Group]


def _size(nbytes: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f}{unit}"
    return f"{nbytes}B"
