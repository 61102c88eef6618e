"""The end of a ``-m`` sweep: one results table and the plots, in the sweep directory.

Registered in ``conf/config.yaml`` as ``hydra.callbacks.sweep_summary``. Each job writes its
own ``metrics.json`` (with its config's identity keys); :meth:`SweepSummary.on_multirun_end`
reads them all and writes

    <sweep dir>/results.csv, results.json     one row per job, sorted by N, S, W
               speedup_vs_psnr.png            speedup against PSNR vs the sequential sample
               latency_vs_n.png               latency against N per (S, W)
               timeline.png                   per-device timeline of the fastest job

and logs them to W&B as one more run (job_type ``sweep``) unless ``wandb.mode=disabled``.
Also shows a progress bar over the sweep's jobs (basic launcher: jobs run in this process).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from experiments import atomic
from experiments.common import FAILED, plain
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["job", "model", "scheduler", "steps", "guidance", "strategy", "n", "stride",
                 "warmup", "time_shift", "stride_noise", "devices", "latency_s", "sequential_s",
                 "speedup", "predicted_speedup", "psnr_db", "ssim", "relative_l2",
                 "bytes_sent_total", "max_device_macs", "imbalance", "overrides"]


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job directory holding a ``metrics.json``, but for a job marked failed
    (``FAILED``: it may have failed after writing its metrics)."""
    rows = []
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        if (path.parent / FAILED).exists():
            log.warning("sweep: job %s failed (%s); left out of the table", path.parent.name,
                        path.parent / FAILED)
            continue
        row = json.loads(path.read_text())
        row["job"] = path.parent.name
        over = path.parent / ".hydra" / "overrides.yaml"
        row["overrides"] = " ".join(OmegaConf.load(over)) if over.exists() else ""
        rows.append(row)
    rows.sort(key=lambda r: (r.get("n", 0), r.get("stride", 0), r.get("warmup", 0), r["job"]))
    return rows


def write_table(rows: list[dict], sweep_dir: Path) -> tuple[Path, Path]:
    cols = TABLE_COLUMNS + sorted({k for r in rows for k in r} - set(TABLE_COLUMNS))
    csv_path, json_path = sweep_dir / "results.csv", sweep_dir / "results.json"
    atomic.write_csv(csv_path, [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                 for k, v in r.items()} for r in rows], cols)
    atomic.write_json(json_path, rows)
    return csv_path, json_path


def summarize(sweep_dir: Path, wandb_settings: dict | None = None) -> dict[str, Path]:
    """Table and plots for the jobs under ``sweep_dir``; returns the written files."""
    from experiments import plots

    rows = collect(sweep_dir)
    if not rows:
        log.warning("sweep %s: no job wrote metrics.json; no results table", sweep_dir)
        return {}
    csv_path, json_path = write_table(rows, sweep_dir)
    files = {"results_csv": csv_path, "results_json": json_path,
             "speedup_vs_psnr": plots.speedup_vs_quality(rows, sweep_dir / "speedup_vs_psnr.png"),
             "latency_vs_n": plots.latency_vs_n(rows, sweep_dir / "latency_vs_n.png")}
    best = max(rows, key=lambda r: r.get("speedup") or 0.0)
    tl = sweep_dir / best["job"] / "timeline.json"
    if tl.exists():
        files["timeline"] = plots.device_timeline(
            json.loads(tl.read_text()), sweep_dir / "timeline.png",
            title=f"job {best['job']}: N={best['n']} S={best['stride']} W={best['warmup']}, "
                  f"speedup {best['speedup']:.2f}x")
    _print_table(rows)
    log.info("sweep results: %s", ", ".join(str(p) for p in files.values()))
    if wandb_settings and wandb_settings.get("mode", "disabled") != "disabled":
        from experiments.wandb_log import RunLogger
        logger = RunLogger(wandb_settings, {"sweep_dir": str(sweep_dir)}, sweep_dir,
                           name=f"sweep-{sweep_dir.name}", job_type="sweep",
                           group=sweep_dir.name)
        logger.table("results", rows)
        logger.images({k: v for k, v in files.items() if str(v).endswith(".png")})
        logger.finish()
    return files


def _print_table(rows: list[dict]) -> None:
    from tabulate import tabulate
    cols = ["job", "n", "stride", "warmup", "latency_s", "sequential_s", "speedup", "psnr_db",
            "ssim"]
    print(tabulate([[r.get(c) for c in cols] for r in rows], cols, tablefmt="github",
                   floatfmt=".3f"))


class SweepSummary(Callback):
    """Hydra callback: progress over the jobs, and :func:`summarize` when the sweep ends."""

    def __init__(self) -> None:
        self.bar = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("progress", True):
            return
        try:
            from experiments.cli import sweep_points
            total = len(sweep_points(list(config.hydra.overrides.task),
                                     config.hydra.sweeper.get("params")))
        except Exception:  # noqa: BLE001 - a progress bar is never worth failing a sweep
            total = None
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc="sweep", unit="job", disable=None)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        # plain data, as every run's logger gets it: wandb.init takes the mode's name, not
        # the schema's enum
        settings = plain(config.wandb) if "wandb" in config else None
        summarize(Path(config.hydra.sweep.dir), settings)
