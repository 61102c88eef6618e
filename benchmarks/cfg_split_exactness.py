"""Is CFG-parallel exact? The two halves of a guidance batch run as two batch-1 calls,
against the one batch-2 call the sequential sampler makes, for the tiny models of
``conf/model`` (random weights, one thread, their example inputs).

    python benchmarks/cfg_split_exactness.py [--models sd15 sd3 dit …]

On this CPU they differ in the last bits (kernels block a batch of 2 differently from a
batch of 1), so CFG-parallel equals bit for bit only a sequential sampler that also makes
two calls per step; against the batched call the difference is printed per model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import zoo  # noqa: E402
from partition.spec import call_denoiser  # noqa: E402


def halves_vs_batch(name: str) -> tuple[tuple[int, ...], float]:
    bundle = zoo.build(zoo.load_yaml(name), "tiny", seed=0)
    inputs = bundle.inputs(0)
    with torch.no_grad():
        full = call_denoiser(bundle.module, inputs, bundle.contract, bundle.specs)
        b = full.shape[0]
        halves = [call_denoiser(bundle.module,
                                {k: v[i:i + 1] if v.dim() and v.shape[0] == b else v
                                 for k, v in inputs.items()}, bundle.contract, bundle.specs)
                  for i in range(b)]
    return tuple(full.shape), float((full - torch.cat(halves)).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["sd15", "sdxl", "sd3", "dit", "pixart",
                                                    "flux"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread: batch-2 call vs two batch-1 calls")
    for name in args.models:
        shape, diff = halves_vs_batch(name)
        print(f"{name:8s} output {list(shape)}  max |difference| {diff:.3g}"
              + ("  (bit for bit)" if diff == 0 else ""))


if __name__ == "__main__":
    main()
