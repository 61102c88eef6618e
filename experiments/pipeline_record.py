"""The record of a pipeline run: images, grid, metrics, plan, W&B (one process writes it).

Images are written at their own resolution with diffusers' own utilities
(``numpy_to_pil``, ``make_image_grid``, ``export_to_gif``). Quality is measured on the
decoded pixels in [0, 1] against the sequential pipeline's pixels from the same seeds: PSNR
and SSIM (torchmetrics, ``experiments/quality.py``; a video's frames count as images), and
LPIPS and CLIP score where their weights are on the machine (``experiments/learned.py``),
otherwise recorded as ``"skipped: <reason>"``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments import atomic
from experiments import quality as Q
from experiments.common import plain, schedule_of
from experiments.generate import request
from experiments.learned import learned_metrics
from experiments.metrics import speedup
from experiments.record import log_run, predicted, save_plans, write_json
from partition import Plan

log = logging.getLogger(__name__)

DIFF_GAIN = 4.0   # the grid's difference column: |asyncdiff − sequential| × 4


def _pil(pixels: torch.Tensor):
    """``[n, 3, H, W]`` in [0, 1] to PIL images."""
    from diffusers.utils import numpy_to_pil
    return numpy_to_pil(pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy())


def _save_item(pixels: torch.Tensor, path: Path) -> Path:
    """One image (``[3, H, W]``) as PNG, or one video (``[F, 3, H, W]``) as GIF."""
    from diffusers.utils import export_to_gif

    if pixels.dim() == 4:
        target = path.with_suffix(".gif")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.gif")  # PIL reads the suffix
        export_to_gif(_pil(pixels), str(tmp))
        os.replace(tmp, target)
        return target
    target = path.with_suffix(".png")
    atomic.write_bytes(target, _png(_pil(pixels[None])[0]))
    return target


def _png(image) -> bytes:
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_images(seq: torch.Tensor, par: torch.Tensor, out: Path) -> dict[str, Path]:
    """Every item of both runs, and ``grid.png``: one row per item (a video: its first
    frame), sequential | asyncdiff | |difference| × :data:`DIFF_GAIN`."""
    from diffusers.utils import make_image_grid

    for i in range(seq.shape[0]):
        _save_item(seq[i], out / "images" / "sequential" / f"{i:03d}")
        _save_item(par[i], out / "images" / "asyncdiff" / f"{i:03d}")
    first = (lambda x: x[:, 0]) if seq.dim() == 5 else (lambda x: x)
    a, b = first(seq), first(par)
    diff = ((a - b).abs() * DIFF_GAIN).clamp(0, 1)
    cells = [img for i in range(a.shape[0]) for img in _pil(torch.stack([a[i], b[i], diff[i]]))]
    grid = out / "images" / "grid.png"
    atomic.write_bytes(grid, _png(make_image_grid(cells, rows=a.shape[0], cols=3)))
    return {"grid": grid}


def quality(seq: torch.Tensor, par: torch.Tensor, prompts: list[str] | None,
            weights_dir) -> dict:
    """Pixel PSNR/SSIM of the asynchronous images against the sequential ones, and the
    learned metrics (or why not)."""
    frames = lambda x: x.reshape(-1, *x.shape[-3:])  # noqa: E731 - a video's frames are images
    a, b = frames(par), frames(seq)
    out = {"psnr_db": Q.psnr(a, b, data_range=1.0), "ssim": Q.ssim(a, b, data_range=1.0),
           "max_abs_diff": float((a.double() - b.double()).abs().max()),
           "identical": bool(torch.equal(a, b))}
    out.update(learned_metrics(a * 2 - 1, b * 2 - 1, weights_dir, prompts))
    return out


def identity(cfg: dict) -> dict:
    """The keys a sweep's results table is indexed by."""
    par, pipe = cfg["parallel"], cfg["pipeline"]
    return {"model": f"pipeline/{pipe['name']}", "pipeline": pipe["cls"],
            "scheduler": None, "steps": cfg["scheduler"]["steps"],
            "guidance": cfg["scheduler"].get("guidance"),
            "strategy": cfg["partition"]["strategy"], "n": par["n"], "stride": par["stride"],
            "warmup": par["warmup"], "time_shift": par["time_shift"],
            "stride_noise": par["stride_noise"], "replicas": 1, "seed": cfg["seed"]}


def finish_pipeline(cfg: DictConfig, out: Path, images: torch.Tensor, extra: dict,
                    ranks: dict[int, dict], baseline: tuple) -> dict:
    """Write the run directory (``experiments/pipeline_run.py``) and the W&B run."""
    data = plain(cfg)
    ref, seq_seconds, seq_first, scheduler = baseline
    plans = [Plan.from_json(p) for p in extra["plans"]]
    sch, steps = schedule_of(data["parallel"]), data["scheduler"]["steps"]
    save_plans(cfg, out, plans, sch, steps)
    req = request(data)
    latency, seq_latency = sum(extra["seconds"]), sum(seq_seconds)
    metrics = {**identity(data), "scheduler": scheduler, "items": len(req.items),
               "latency_s": latency, "sequential_s": seq_latency,
               "speedup": speedup(seq_latency, latency),
               "first_call_s": extra["first_call_s"], "sequential_first_call_s": seq_first,
               "devices": len(ranks),
               "peak_rss_mb_per_rank": [ranks[r]["peak_rss"] / 2**20 for r in sorted(ranks)]}
    if plans:
        pred = predicted(plans[0], sch, steps)
        metrics.update(predicted_speedup=pred["speedup"], ideal_speedup=pred["ideal_speedup"],
                       plan_hash=plans[0].plan_hash, imbalance=plans[0].imbalance,
                       plan_hashes=[p.plan_hash for p in plans])
    prompts = [p for p, _ in req.items] if req.kind == "text" else None
    metrics.update(quality(ref, images, prompts, data["metrics"]["weights_dir"]))
    files = save_images(ref, images, out) if data["save_images"] else {}
    atomic.save_torch({"sequential": ref, "asyncdiff": images}, out / "images.pt")
    write_json(out / "metrics.json", metrics)
    label = f"{req.cls} {sch.describe()}, {req.steps} steps"
    log.info("%s: asyncdiff %.3f s, sequential %.3f s, speedup %.2fx; PSNR %.1f dB, SSIM %.4f "
             "vs sequential (%d item(s)); %s", label, latency, seq_latency, metrics["speedup"],
             metrics["psnr_db"], metrics["ssim"], len(req.items), out)
    log_run(data, out, f"{data['pipeline']['name']}-N{sch.n}S{sch.stride}W{sch.warmup}", plans,
            metrics, files)
    return metrics
