"""The drop-in on every pipeline class of tests/pipelines.py: writes docs/pipelines.md.

    python benchmarks/dropin_pipelines.py > docs/results/pipelines.txt

For each tiny pipeline (random weights, guidance on, 5 steps, one thread): the plain run,
then ``asyncdiff.parallelize(pipe, n=2)`` with every call warm (must equal the plain run bit
for bit), with W = 1 (S = 1 and S = 2: finite, relative L2 distance to the plain latents),
and after ``detach()`` (must equal the plain run again). The same checks are tests
(tests/asyncdiff/test_dropin_pipelines.py); this script records them as a table.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # tests/pipelines.py (after the packages of the same name)

import asyncdiff  # noqa: E402
from experiments.atomic import write_text  # noqa: E402
from pipelines import PIPELINES  # noqa: E402

STEPS = 5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def one(name: str) -> dict:
    case = PIPELINES[name]
    pipe = case.build()
    pipe.set_progress_bar_config(disable=True)
    denoisers = {a: type(getattr(pipe, a)).__name__ for a in ("unet", "transformer",
                                                               "transformer_2")
                 if isinstance(getattr(pipe, a, None), torch.nn.Module)}
    t0 = time.perf_counter()
    plain = case.call(pipe, STEPS)
    handle = asyncdiff.parallelize(pipe, n=2, warmup=4 * STEPS)
    warm = case.call(pipe, STEPS)
    streams = sorted(handle.streams)
    handle.set_timeline(warmup=1)
    s1 = case.call(pipe, STEPS)
    handle.set_timeline(stride=2)
    s2 = case.call(pipe, STEPS)
    backends = sorted({s.plan.backend for s in handle.sessions.values()})
    handle.detach()
    after = case.call(pipe, STEPS)
    return dict(name=name, pipeline=type(pipe).__name__, denoisers=denoisers, streams=streams,
                backend="/".join(backends), exact=torch.equal(warm, plain),
                restored=torch.equal(after, plain),
                finite=bool(torch.isfinite(s1).all() and torch.isfinite(s2).all()),
                s1=rel(s1, plain), s2=rel(s2, plain), seconds=time.perf_counter() - t0,
                note=case.note)


def table(rows: list[dict]) -> str:
    head = ("# The drop-in on diffusers pipelines\n\n"
            "Written by `python benchmarks/dropin_pipelines.py` (raw output: "
            "`docs/results/pipelines.txt`). Each pipeline is the unmodified diffusers class "
            "with tiny random components (tests/pipelines.py), guidance on, "
            f"{STEPS} steps, one thread, `asyncdiff.parallelize(pipe, n=2)`. *warm = plain*: "
            "every call warm, the latents equal the plain pipeline's bit for bit; *W=1*: "
            "relative L2 distance of the stale run's latents to the plain ones at S = 1 and "
            "S = 2 (random tiny models: a check that the run completes, not a quality "
            "figure); *streams*: the denoiser calls per step ([Note: drop-in steps]); "
            "*detach*: the plain result again after `detach()`.\n\n"
            "| case | pipeline | denoiser | streams | backend | warm = plain | W=1 S=1 / S=2 "
            "| detach | note |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | | **failed** | | | {r['error']} |")
            continue
        den = ", ".join(f"{a}: {c}" for a, c in r["denoisers"].items())
        streams = ", ".join(f"{a}#{j}" for a, j in r["streams"])
        lines.append(f"| {r['name']} | {r['pipeline']} | {den} | {streams} | {r['backend']} | "
                     f"{'✓' if r['exact'] else '✗'} | "
                     f"{r['s1']:.3f} / {r['s2']:.3f}{'' if r['finite'] else ' (not finite)'} | "
                     f"{'✓' if r['restored'] else '✗'} | {r['note']} |")
    return head + "\n".join(lines) + "\n" + LIMITS


LIMITS = """
## Limits (each an error naming the pipeline, or stated in the plan; never a wrong image)

- **Steps come from the scheduler.** A pipeline must call `scheduler.set_timesteps` once per
  run and `scheduler.step` once per step. Pipelines that do not (diffusion forcing with
  per-frame schedules such as SkyReels-V2's, `ScoreSdeVePipeline`'s predictor-corrector
  steps, ParaDiGMS' parallel sampling) are refused at the first call or at the first step the
  scheduler's own `step_index` disagrees with the drop-in's count.
- **One stream, every step.** A branch called only on some steps (guidance applied every
  other step) is refused when it skips a step; a stream keeps its first call's structure
  (the same inputs, shapes, dtypes and non-tensor arguments), so a branch that changes
  position within a step is refused naming the input that changed. Values are not
  structure: conditioning that varies across steps (a ControlNet applied on a window of the
  steps, a guidance schedule) is each step's conditioning. More than 8 calls of one
  denoiser between two `scheduler.step` calls (a loop stepping a sampler of its own) are
  refused.
- **A forward wrapped by the user** (`pipe.unet.forward = spy`, an instance attribute) is
  refused in one line when set before `parallelize` (the drop-in would take its place);
  set after, it wraps the drop-in's forward, sees every call, and stays after `detach()`.
  diffusers' and accelerate's own hooks are part of the module.
- **Changed modules are captured again.** The module's plain attributes (an IP-Adapter's
  scale, `train()`/`eval()`, layers added by a LoRA) are part of the capture's key: a
  change between runs means a new capture, never a stale one.
- **Timesteps fed transformed** (`t / 1000`, `t · 0.001`, `1 − t / 1000`, `0.25 log σ` as
  the scheduler lists it) run at S = 1 as fed; at S = 2 with `stride_noise="fresh"` the next
  step's value is predicted by the transform that reproduced every value so far and checked
  when the pipeline feeds it. A transform outside that list needs S = 1 or
  `stride_noise="reuse"`.
- **Capture.** A denoiser torch.export cannot capture at the pipeline's shapes (CogVideoX at
  a resolution whose sin-cos table is rebuilt inside `forward`; diffusers' layerwise casting
  hooks) runs on the module backend: exact, stated in the log and in `plan.notes`, but the
  glue between blocks runs on every stage. Stateful diffusers hooks (FasterCache, Pyramid
  Attention Broadcast, FirstBlockCache, TaylorSeer …) are refused with one line naming them
  and how to disable them.
- Not covered by this table: `StableDiffusionLatentUpscalePipeline` (needs its text
  encoder), pipelines whose text encoders cannot be replaced by embeddings.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"cases (default: all of {', '.join(PIPELINES)})")
    ap.add_argument("--out", default=str(ROOT / "docs" / "pipelines.md"))
    args = ap.parse_args()
    bad = [n for n in args.names if n not in PIPELINES]
    if bad:
        ap.error(f"case={bad[0]!r}; allowed: {', '.join(PIPELINES)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.names or list(PIPELINES):
        try:
            r = one(name)
            print(f"{name:20s} {r['pipeline']:40s} streams {len(r['streams'])} {r['backend']:6s}"
                  f" exact {r['exact']} restored {r['restored']} W=1 {r['s1']:.3f}/{r['s2']:.3f}"
                  f" {r['seconds']:.1f} s", flush=True)
        except Exception as err:  # noqa: BLE001 - recorded in the table, the run goes on
            traceback.print_exc()
            r = dict(name=name, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            print(f"{name:20s} FAILED {r['error']}", flush=True)
        rows.append(r)
    write_text(Path(args.out), table(rows))
    print(f"wrote {args.out}: {sum(r.get('exact', False) for r in rows)} of {len(rows)} exact")


if __name__ == "__main__":
    main()
