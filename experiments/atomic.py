"""Every output file is written whole or not at all: to a temporary name in the same
directory, then renamed over the target (``os.replace`` is atomic on one file system). An
interrupted run leaves the previous file, or none, never half of one."""
from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path


@contextlib.contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """A temporary path to write; renamed to ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a per-process name: concurrent writers (two studies sharing a cache) never share it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data, **kw) -> None:
    write_text(path, json.dumps(data, **{"indent": 1, **kw}) + "\n")


def write_csv(path: str | Path, rows: Iterable[Mapping], fields: list[str]) -> None:
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def save_torch(obj, path: str | Path) -> None:
    import torch
    with atomic(path) as tmp:
        torch.save(obj, tmp)


def save_figure(fig, path: str | Path, **kw) -> None:
    with atomic(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kw)
