"""Peak resident memory of each rank: the denoiser loaded lazily (each rank reads only its
own stage, ``pipeline.load=lazy``) next to loaded whole (each rank loads everything, then
drops what its stage does not use: ``pipeline.load=whole``), next to the whole model and to
the rank's share of the weights.

The checkpoint: a ``StableDiffusionPipeline`` whose UNet has SD 1.5's layout (block types,
two layers per block, cross-attention 768) at ``--channels`` base width (160: half of SD 1.5,
~860 MB of fp32 safetensors), random weights, with a small text encoder and VAE, saved with
``save_pretrained``. Each run is ``asyncdiff-run pipeline=sd15`` (self-spawned ranks, gloo,
one thread each, T = 2, W = 1); the ranks' peaks are its ``peak_rss_mb_per_rank``, the
shares the plan's ``param_bytes`` per stage. ``whole process``: one process that loads the
pipeline whole and generates once (what a rank of the replicated official code holds).

    python benchmarks/memory_lazy.py                 # ~10 min on 2 CPU cores
    python benchmarks/memory_lazy.py --channels 64   # a quick look (~140 MB checkpoint)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 2 ** 20


def save_checkpoint(path: Path, channels: int, px: int) -> float:
    """Write the pipeline; return the UNet's safetensors size in MB."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from experiments import checkpoints

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=px // 2, block_out_channels=tuple(
        channels * m for m in (1, 2, 4, 4)), cross_attention_dim=768).eval()
    pipe = StableDiffusionPipeline(
        vae=checkpoints.vae(), text_encoder=checkpoints.clip_text(768),
        tokenizer=checkpoints.tokenizer(), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / MB


WHOLE = """
import resource, sys, torch
from diffusers import DiffusionPipeline
torch.set_num_threads(1)
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
pipe.set_progress_bar_config(disable=True)
pipe("a photograph", num_inference_steps=2, height=int(sys.argv[2]), width=int(sys.argv[2]),
     generator=torch.Generator().manual_seed(0), output_type="pt")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run(path: Path, n: int, load: str, px: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "experiments.run", "pipeline=sd15", f"pipeline.path={path}",
           f"pipeline.height={px}", f"pipeline.width={px}", "scheduler.steps=2",
           f"parallel.n={n}", "parallel.warmup=1", "parallel.threads=1",
           "pipeline.warm_call=false", f"pipeline.load={load}", "wandb.mode=disabled",
           f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    return {"peak": [float(v) for v in metrics["peak_rss_mb_per_rank"]],
            "share": [s["param_bytes"] / MB for s in plan["stages"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=160, help="the UNet's base width")
    ap.add_argument("--px", type=int, default=64, help="image size (latent: half)")
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd_layout"
        size = save_checkpoint(path, args.channels, args.px)
        whole = subprocess.run([sys.executable, "-c", WHOLE, str(path), str(args.px)],
                               capture_output=True, text=True, check=True)
        whole_mb = float(whole.stdout.split()[-1])
        print(f"UNet checkpoint: {size:.0f} MB of safetensors (SD 1.5 layout, base width "
              f"{args.channels}); one process holding the pipeline whole: peak {whole_mb:.0f} MB")
        print(f"{'N':>2} {'rank':>4} {'share MB':>9} {'lazy peak':>10} {'lazy-share':>11} "
              f"{'whole peak':>11} {'lazy/whole':>10}")
        for n in args.ns:
            lazy = run(path, n, "lazy", args.px, Path(tmp) / f"lazy{n}")
            full = run(path, n, "whole", args.px, Path(tmp) / f"whole{n}")
            for r in range(n):
                print(f"{n:>2} {r:>4} {lazy['share'][r]:>9.0f} {lazy['peak'][r]:>10.0f} "
                      f"{lazy['peak'][r] - lazy['share'][r]:>11.0f} {full['peak'][r]:>11.0f} "
                      f"{lazy['peak'][r] / full['peak'][r]:>10.2f}")


if __name__ == "__main__":
    main()
