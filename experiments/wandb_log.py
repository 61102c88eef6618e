"""Weights & Biases logging: the only module that imports ``wandb``.

``wandb.mode``: ``offline`` (default; needs no account and no network: the run is written
under ``<wandb.dir or run dir>/wandb/offline-run-*`` and can be uploaded later with
``wandb sync``), ``online`` (after ``wandb login``), ``disabled`` (wandb is not imported).
Only one process logs: the parent of self-spawned workers, or rank 0 under torchrun.

A run logs its resolved config, the plan (a ``wandb.Table`` of stages), per-round timings
per device (history ``device<d>/compute_ms`` and ``device<d>/round_ms`` at step = round,
plus a table of every rank's rounds), the metrics (summary), sample images and plots.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PLAN_COLUMNS = ["stage", "first_module", "last_module", "GFLOPs", "GMACs", "params",
                "replicated_params", "inputs", "outputs", "MiB_in", "ms"]


def plan_rows(plan) -> list[list]:
    ms = plan.measured.stage_ms if plan.measured else [None] * plan.n
    rows = []
    for st, t in zip(plan.stages, ms):
        mib_in = sum(v.bytes for v in plan.values if st.index in v.consumers) / 2**20
        rows.append([st.index, st.segments[0].first_module or "<glue>",
                     st.segments[-1].last_module or "<glue>", st.flops / 1e9, st.macs / 1e9,
                     st.params, st.replicated_params, len(st.inputs), len(st.outputs), mib_in, t])
    return rows


class RunLogger:
    """One W&B run; every method is a no-op when disabled (wandb never imported)."""

    def __init__(self, settings: Mapping, config: Mapping, out_dir: Path, *, name: str,
                 job_type: str = "run", group: str | None = None, enabled: bool = True):
        self.run = None
        mode = settings.get("mode", "offline")
        if not enabled or mode == "disabled":
            return
        import wandb

        root = Path(settings.get("dir") or out_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            mode=mode, project=settings.get("project"), entity=settings.get("entity"),
            group=settings.get("group") or group, tags=list(settings.get("tags") or []),
            name=name, job_type=job_type, dir=str(root), config=dict(config),
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True))
        log.info("W&B %s run %s in %s", mode, self.run.id, self.run.dir)

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def plan(self, plan) -> None:
        if self.run:
            self.run.log({"plan": self._wandb.Table(columns=PLAN_COLUMNS, data=plan_rows(plan))},
                         commit=False)
            self.run.summary.update({"plan/imbalance": plan.imbalance, "plan/n": plan.n,
                                     "plan/bytes_per_step": plan.bytes_per_step,
                                     "plan/hash": plan.plan_hash})

    def timings(self, rows: Sequence[Mapping], replica: int = 0) -> None:
        """Per-round timings of every device of one pipeline (CFG-parallel: the first guidance
        group's) as history (step = round)."""
        if not self.run:
            return
        by_round: dict[int, dict] = {}
        for r in rows:
            if r["replica"] == replica and r.get("group", 0) == 0:
                d = by_round.setdefault(r["round"], {})
                d[f"device{r['device']}/compute_ms"] = r["compute_ms"]
                d[f"device{r['device']}/round_ms"] = r["round_ms"]
        for rnd in sorted(by_round):
            self.run.log(by_round[rnd], step=rnd)
        cols = list(rows[0]) if rows else []
        self.run.log({"timeline": self._wandb.Table(columns=cols,
                                                   data=[[r[c] for c in cols] for r in rows])})

    def metrics(self, values: Mapping) -> None:
        if self.run:
            self.run.summary.update({k: v for k, v in values.items()
                                     if isinstance(v, (int, float, str, bool)) or v is None})

    def images(self, paths: Mapping[str, Path]) -> None:
        if self.run:
            self.run.log({k: self._wandb.Image(str(p)) for k, p in paths.items()
                          if Path(p).exists()})

    def table(self, key: str, rows: Sequence[Mapping]) -> None:
        if self.run and rows:
            cols = sorted({c for r in rows for c in r})
            self.run.log({key: self._wandb.Table(
                columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in rows])})

    def finish(self) -> None:
        if self.run:
            self.run.finish()
            self.run = None


def _cell(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


# --------------------------------------------------------------------------- reading back

_HEADER = struct.Struct("<4sHB")   # ":W&B", magic 0xBEE1, version
_RECORD = struct.Struct("<IHB")    # crc32, length, type (1 full, 2 first, 3 middle, 4 last)
_BLOCK = 32768


def offline_records(run_dir: str | Path) -> Iterator:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file.

    wandb ≥ 0.19 has no Python reader for its transaction log (LevelDB's log format:
    32 KiB blocks of CRC-framed chunks), so this is a small one: yields
    ``wandb_internal_pb2.Record`` (``record.WhichOneof("record_type")``: run, config,
    history, summary, files, ...). Lets tests and users inspect an offline run before syncing.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_dir).glob("run-*.wandb"))
    data = path.read_bytes()
    ident, magic, _ = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, buf = _HEADER.size, b""
    while pos + _RECORD.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD.size:
            pos += left
            continue
        _, length, kind = _RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _RECORD.size: pos + _RECORD.size + length]
        pos += _RECORD.size + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record
