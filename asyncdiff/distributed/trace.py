"""Record every point-to-point ``torch.distributed`` call a process makes, as it is made.

What the executor posts is derived from the lowering; this records what actually reaches
``torch.distributed`` (``batch_isend_irecv`` groups, and any lone ``isend``/``irecv``/
``send``/``recv``, each its own one-operation group), so the recorded calls can be compared
with the lowered program call for call and replayed under NCCL's rules
(:func:`asyncdiff.lowering.replay`). A worker records when its job asks for it
(``WorkerJob.trace_dir``) or when ``ASYNCDIFF_TRACE_COMM`` names a directory (any launcher,
torchrun too): ``rank<r>.json`` there.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from asyncdiff.lowering import Comm, Group, Payload

ENV = "ASYNCDIFF_TRACE_COMM"
_DTYPES = {"torch.float32": "float32", "torch.float16": "float16",
           "torch.bfloat16": "bfloat16", "torch.float64": "float64", "torch.int64": "int64",
           "torch.int32": "int32"}

Call = tuple[str, int, int, str]  # (op, peer, element count, dtype)


@contextlib.contextmanager
def recording() -> Iterator[list[list[Call]]]:
    """Patch ``torch.distributed``'s point-to-point functions for the duration; yield the
    list the calls are appended to (one list per posted group)."""
    calls: list[list[Call]] = []
    saved = {name: getattr(dist, name) for name in
             ("isend", "irecv", "send", "recv", "batch_isend_irecv")}
    inside = [False]

    def lone(name: str, op: str):
        def call(tensor, *args, **kwargs):
            if not inside[0]:
                peer = next((kwargs[k] for k in ("dst", "src", "group_dst", "group_src")
                             if kwargs.get(k) is not None), args[0] if args else None)
                calls.append([_call(op, peer, tensor)])
            return saved[name](tensor, *args, **kwargs)
        return call

    def batch(ops):
        calls.append([_call("send" if p.op in (dist.isend, saved["isend"]) else "recv",
                            p.peer, p.tensor) for p in ops])
        inside[0] = True
        try:
            return saved["batch_isend_irecv"](ops)
        finally:
            inside[0] = False

    for name, op in (("isend", "send"), ("send", "send"), ("irecv", "recv"), ("recv", "recv")):
        setattr(dist, name, lone(name, op))
    dist.batch_isend_irecv = batch
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _call(op: str, peer, tensor) -> Call:
    return (op, int(peer), int(tensor.numel()), _DTYPES.get(str(tensor.dtype), str(tensor.dtype)))


def trace_dir(job_dir: str | None) -> Path | None:
    where = job_dir or os.environ.get(ENV)
    return Path(where) if where else None


def save(calls: list[list[Call]], where: Path, rank: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    (where / f"rank{rank}.json").write_text(json.dumps(calls))


def load(where: Path) -> dict[int, list[list[Call]]]:
    """Every rank's recorded calls from ``where``."""
    out = {}
    for f in sorted(where.glob("rank*.json")):
        out[int(f.stem[4:])] = [[tuple(c) for c in g] for g in json.loads(f.read_text())]
    return out


def as_groups(calls: list[list[Call]]) -> list[Group]:
    """Recorded calls as groups :func:`asyncdiff.lowering.replay` takes (round: the index)."""
    return [Group(i, "recorded", tuple(Comm(op, peer, Payload("values", dtype, numel))  # type: ignore[arg-type]
                                     for op, peer, numel, dtype in g))
            for i, g in enumerate(calls)]


def lowered_calls(program) -> list[list[Call]]:
    """A rank's lowered program as the calls it makes (hoist first, once)."""
    return [[(c.op, c.peer, c.payload.numel, c.payload.dtype) for c in g.ops]
            for g in program.groups()]
