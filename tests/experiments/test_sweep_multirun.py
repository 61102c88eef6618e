"""A 2×2×2 multirun sweep (N × S × W) on a tiny model ends with one results table and the
plots in the sweep directory (experiments.sweep.SweepSummary, a Hydra callback)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from exp_helpers import FAST, MODEL, REPO, env

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_stride_warmup_sweep_writes_table_and_plots(tmp_path):
    sweep = tmp_path / "sweep"
    # the study's own params (parallel.n=2,3 parallel.stride=1,2 parallel.warmup=1,3)
    args = [sys.executable, "-m", "experiments.run", "-m", "+experiment=stride_warmup", MODEL,
            *FAST, "save_images=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    got = sorted((int(r["n"]), int(r["stride"]), int(r["warmup"])) for r in rows)
    assert got == [(n, s, w) for n in (2, 3) for s in (1, 2) for w in (1, 3)]
    for r in rows:
        assert float(r["latency_s"]) > 0 and float(r["speedup"]) > 0
        assert 0 < float(r["psnr_db"]) <= 100 and -1 < float(r["ssim"]) <= 1
    assert json.loads((sweep / "results.json").read_text())[0]["model"] == "sd3/tiny"
    for png in ("speedup_vs_psnr.png", "latency_vs_n.png", "timeline.png"):
        assert (sweep / png).read_bytes()[:8] == PNG, png
    # one directory per job, each with its plan and metrics (no images: save_images=false)
    for job in range(8):
        assert {"metrics.json", "plan.json", "timeline.json"} <= {
            p.name for p in (sweep / str(job)).iterdir()}
