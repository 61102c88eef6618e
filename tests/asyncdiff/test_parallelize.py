"""The diffusers drop-in on unmodified pipelines: SD 1.5, SDXL, SD3, PixArt-α.

Tiny pipelines are built from the zoo's tiny configs (``conf/model/*.yaml``; every weight
re-drawn, docs/design.md §2) with a tiny VAE and no text encoder or tokenizer: the prompts enter
as embeddings. For each family:

* ``warmup >= steps``: the parallelized pipeline's latents equal the unpatched pipeline's
  bit for bit (invariant 2), so the capture of the pipeline's real call is exact;
* ``warmup = 1``: they equal an independent computation, our ``schedulers.sample`` driving
  ``PipelineDenoiser(Emulator(...))`` on the same embeddings and noise, and differ from the
  sequential latents. The reference shares only the staged model with the handle (its
  exactness is the first point); the call flattening, the step count, the timesteps, the
  timeline and the answer's form are the drop-in's own and are checked here;
* ``detach()`` restores every parameter (``torch.equal``) and the sequential output.

One torchrun test runs the distributed drop-in (2 ranks, gloo) and compares it with the
emulated one. The family table is imported by that subprocess's script, so both sides build
the same pipelines.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import asyncdiff
from asyncdiff.denoiser import PipelineDenoiser
from asyncdiff.emulate import Emulator
from asyncdiff.step_cache import build_cache_timeline
from asyncdiff.timeline import build_timeline
from experiments import zoo
from schedulers import make_scheduler, sample

# diffusers' pipeline classes are placeholders without transformers (their text encoders'
# library), even with no text encoder in use; it belongs in the [dev] extras

STEPS = 4
GUIDANCE = 5.0
PIXELS = 32   # a 2-level tiny VAE: latents are 16 x 16
THREADS = 1


# ------------------------------------------------------------------------------ families


def _denoiser(name: str, **overrides):
    cfg = zoo.load_yaml(name)
    return zoo.diffusers_from_config(cfg["builder"]["cls"], {**cfg["tiny"]["config"], **overrides},
                                     seed=0)


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=PIXELS)
    return zoo.reinit_(vae, 1).eval()


def _embeds(channels: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"pe": torch.randn(1, 8, 32, generator=g), "ne": torch.randn(1, 8, 32, generator=g),
            "pooled": torch.randn(1, 32, generator=g),
            "neg_pooled": torch.randn(1, 32, generator=g),
            "mask": torch.ones(1, 8, dtype=torch.int64),
            "latents": torch.randn(1, channels, 16, 16, generator=g)}


@dataclass(frozen=True)
class Family:
    """How to build one pipeline, call it, and state its denoiser's inputs by hand."""

    name: str
    build: Callable[[], Any]
    kwargs: Callable[[dict], dict]          # the pipeline call's inputs
    cond: Callable[[dict, bool], dict]      # denoiser conditioning, by hand (True: uncond)
    channels: int
    eps: Callable[[torch.Tensor], torch.Tensor] = lambda out: out  # what the loop keeps

    @functools.cached_property
    def inputs(self) -> dict:
        return _embeds(self.channels)

    def run(self, pipe, steps: int = STEPS) -> torch.Tensor:
        torch.set_num_threads(THREADS)
        kw = self.kwargs(self.inputs)
        return pipe(**kw, latents=self.inputs["latents"].clone(), num_inference_steps=steps,
                    guidance_scale=GUIDANCE, height=PIXELS, width=PIXELS,
                    output_type="latent").images

    def fresh_scheduler(self, pipe):
        return type(pipe.scheduler).from_config(pipe.scheduler.config)


def _sd15():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=_vae(4), text_encoder=None, tokenizer=None,
                                   unet=_denoiser("sd15"), scheduler=make_scheduler("ddim"),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _sdxl():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=_vae(4), text_encoder=None, text_encoder_2=None,
                                     tokenizer=None, tokenizer_2=None, unet=_denoiser("sdxl"),
                                     scheduler=make_scheduler("euler"))


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=_denoiser("sd3"), vae=_vae(16),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def _pixart():
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(4),
                               # sample_size 128: the pipeline passes the resolution and
                               # aspect-ratio conditions only for PixArt-α 1024's size
                               transformer=_denoiser("pixart", sample_size=128),
                               scheduler=make_scheduler("dpmsolver++"))


_TIME_IDS = torch.tensor([[PIXELS, PIXELS, 0, 0, PIXELS, PIXELS]], dtype=torch.float32)

FAMILIES = {f.name: f for f in [
    Family("sd15", _sd15, channels=4,
           kwargs=lambda e: dict(prompt_embeds=e["pe"], negative_prompt_embeds=e["ne"]),
           cond=lambda e, u: {"encoder_hidden_states": e["ne" if u else "pe"]}),
    Family("sdxl", _sdxl, channels=4,
           kwargs=lambda e: dict(prompt_embeds=e["pe"], negative_prompt_embeds=e["ne"],
                                 pooled_prompt_embeds=e["pooled"],
                                 negative_pooled_prompt_embeds=e["neg_pooled"]),
           # SDXL's added conditions: pooled text and (orig h, w, crop top, left, target h, w)
           cond=lambda e, u: {"encoder_hidden_states": e["ne" if u else "pe"],
                              "added_cond_kwargs.text_embeds": e["neg_pooled" if u else "pooled"],
                              "added_cond_kwargs.time_ids": _TIME_IDS}),
    Family("sd3", _sd3, channels=16,
           kwargs=lambda e: dict(prompt_embeds=e["pe"], negative_prompt_embeds=e["ne"],
                                 pooled_prompt_embeds=e["pooled"],
                                 negative_pooled_prompt_embeds=e["neg_pooled"]),
           cond=lambda e, u: {"encoder_hidden_states": e["ne" if u else "pe"],
                              "pooled_projections": e["neg_pooled" if u else "pooled"]}),
    Family("pixart", _pixart, channels=4,
           kwargs=lambda e: dict(prompt_embeds=e["pe"], negative_prompt_embeds=e["ne"],
                                 prompt_attention_mask=e["mask"],
                                 negative_prompt_attention_mask=e["mask"],
                                 negative_prompt=None,  # its default "" clashes with embeds
                                 use_resolution_binning=False),
           cond=lambda e, u: {"encoder_hidden_states": e["ne" if u else "pe"],
                              "encoder_attention_mask": e["mask"],
                              "added_cond_kwargs.resolution": torch.tensor([[32.0, 32.0]]),
                              "added_cond_kwargs.aspect_ratio": torch.tensor([[1.0]])},
           # learned σ: the network emits [ε, variance]; the pipeline keeps the first half
           eps=lambda out: out.chunk(2, dim=1)[0]),
]}


class _NoInputScaling:
    """Flow matching has no input scaling: the SD3 pipeline neither calls
    ``scale_model_input`` nor multiplies the start latents by ``init_noise_sigma``; this
    gives ``schedulers.sample`` those two as identities and forwards everything else."""

    init_noise_sigma = 1.0

    def __init__(self, inner):
        self.inner = inner

    def scale_model_input(self, x, t):
        return x

    def __getattr__(self, name):
        return getattr(self.inner, name)


@functools.lru_cache(maxsize=None)
def pipeline(name: str):
    torch.set_num_threads(THREADS)
    fam = FAMILIES[name]
    pipe = fam.build()
    pipe.set_progress_bar_config(disable=True)
    return pipe, fam.run(pipe)  # the pipeline and its sequential (unpatched) latents


def reference(name: str, handle, *, n: int, stride: int = 1, warmup: int = 1,
              time_shift: bool = False, steps: int = STEPS,
              stride_noise: str = "fresh", timeline=None) -> torch.Tensor:
    """``schedulers.sample`` + ``PipelineDenoiser(Emulator)`` on the handle's staged model
    (on ``timeline``, else the one the arguments build)."""
    fam = FAMILIES[name]
    pipe, _ = pipeline(name)
    (session,) = handle.sessions.values()
    tau = fam.fresh_scheduler(pipe)
    tau.set_timesteps(steps)
    timeline = timeline or build_timeline(n, stride, min(warmup, steps), steps, time_shift,
                                          stride_noise)
    inner = PipelineDenoiser(Emulator(session.staged, session.plan, timeline, tau.timesteps))

    def denoiser(x, t, k, cond):
        return fam.eps(inner(x, t, k, cond))

    sched = fam.fresh_scheduler(pipe)
    if not hasattr(sched, "scale_model_input"):
        sched = _NoInputScaling(sched)
    e = fam.inputs
    return sample(denoiser, sched, e["latents"], fam.cond(e, False), steps=steps,
                  guidance_scale=GUIDANCE, uncond=fam.cond(e, True))


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(module, saved: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in now)


@functools.lru_cache(maxsize=None)
def dropin(name: str, n: int = 2, stride: int = 1, time_shift: bool = False,
           backend: str = "auto") -> dict:
    """One handle on the pipeline: a run with every step warm, then (``set_timeline``, same
    capture) a run with W = 1, the reference, and the state after ``detach()``."""
    pipe, _ = pipeline(name)
    module = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    saved = snapshot(module)
    fam = FAMILIES[name]
    handle = asyncdiff.parallelize(pipe, n=n, stride=stride, warmup=STEPS + 3,  # clamped to T
                                   time_shift=time_shift, backend=backend)
    warm = fam.run(pipe)
    handle.set_timeline(warmup=1)
    got = fam.run(pipe)
    want = reference(name, handle, n=n, stride=stride, warmup=1, time_shift=time_shift)
    captures = len(handle.sessions)
    backend = next(iter(handle.sessions.values())).plan.backend
    handle.detach()
    return dict(warm=warm, got=got, want=want, captures=captures, backend=backend,
                restored=same_state(module, saved), forward="forward" in module.__dict__,
                after=fam.run(pipe))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


# ------------------------------------------------------------------------------ emulate


@pytest.mark.parametrize("name,n,stride,time_shift,backend", [
    pytest.param("sd15", 2, 1, False, "auto", marks=pytest.mark.slow),
    pytest.param("sdxl", 2, 1, False, "auto", marks=pytest.mark.slow),
    ("sd3", 2, 1, False, "auto"),
    pytest.param("pixart", 2, 1, False, "auto", marks=pytest.mark.slow),
    ("sd3", 3, 2, False, "auto"),
    pytest.param("pixart", 2, 2, True, "auto", marks=pytest.mark.slow),
    ("sd15", 3, 1, False, "module"), ("pixart", 2, 2, False, "module"),
])
def test_dropin_equals_sequential_and_emulator_and_detaches(name, n, stride, time_shift,
                                                            backend):
    _, sequential = pipeline(name)
    r = dropin(name, n, stride, time_shift, backend)
    assert r["backend"] == ("graph" if backend == "auto" else backend)
    assert torch.equal(r["warm"], sequential)         # W >= T: the pipeline's own result
    assert torch.equal(r["got"], r["want"])           # W = 1: schedulers.sample + Emulator
    assert not torch.equal(r["got"], sequential)
    assert r["captures"] == 1                         # one capture per shape
    assert r["restored"] and not r["forward"]         # detach: parameters, forward
    assert torch.equal(r["after"], sequential)


# S = 1 is the same schedule in every stride-noise mode (test_timeline.py); here S = 2 with
# N = 2, 3, 4, odd and even W (the load-only step), time shift on and off
@pytest.mark.parametrize("n,stride,warmup,time_shift", [
    (2, 2, 2, False), (3, 2, 1, False), (3, 2, 2, True), (4, 2, 4, False),
])
@pytest.mark.slow
def test_paper_split_and_official_schedule_equal_the_emulator(n, stride, warmup, time_shift):
    """The paper's SD 1.5 split (partition/paper_splits/paper_sd15_n<N>.yaml) through the drop-in, on
    the unmodified pipeline with DDIM and CFG, run on the public code's schedule
    (stride_noise='official': with an even W a load-only step), equals schedulers.sample +
    Emulator on the same timeline."""
    steps = 7
    pipe, sequential = pipeline("sd15")
    with asyncdiff.parallelize(pipe, split=f"paper_sd15_n{n}", stride=stride, warmup=warmup,
                               time_shift=time_shift, stride_noise="official") as handle:
        got = FAMILIES["sd15"].run(pipe, steps=steps)
        (session,) = handle.sessions.values()
        want = reference("sd15", handle, n=n, stride=stride, warmup=warmup,
                         time_shift=time_shift, steps=steps, stride_noise="official")
    assert session.plan.strategy == "manual" and session.plan.n == n
    assert torch.equal(got, want)
    assert not torch.equal(got, FAMILIES["sd15"].run(pipe, steps=steps))


@pytest.mark.slow
def test_a_saved_plan_gives_the_same_plan_and_result(tmp_path):
    pipe, _ = pipeline("sd15")
    with asyncdiff.parallelize(pipe, n=2, boundaries=["up_blocks.1"]) as handle:
        first = FAMILIES["sd15"].run(pipe)
        (session,) = handle.sessions.values()
    (tmp_path / "plan.json").write_text(session.plan.to_json())
    with asyncdiff.parallelize(pipe, plan=tmp_path / "plan.json") as handle:
        again = FAMILIES["sd15"].run(pipe)
        (loaded,) = handle.sessions.values()
    assert loaded.plan.plan_hash == session.plan.plan_hash
    assert torch.equal(again, first)
    pixart, _ = pipeline("pixart")  # another model's plan: refused by its graph hash
    with asyncdiff.parallelize(pixart, plan=tmp_path / "plan.json"):
        with pytest.raises(ValueError, match="plan graph_hash=.* but this capture is"):
            FAMILIES["pixart"].run(pixart)


@pytest.mark.slow
def test_step_cache_through_the_dropin():
    """cache_interval=K on one device (emulate): K = 1 is the sequential sampler (the plain
    pipeline) bit for bit; K = 2, 3 and K > T (clamped to T: one full step, the rest cached)
    equal schedulers.sample + Emulator on the cache timeline, on the handle's shell/core
    stages."""
    pipe, sequential = pipeline("sd15")
    with asyncdiff.parallelize(pipe, n=3, strategy="shell_core", cache_interval=1) as handle:
        assert torch.equal(FAMILIES["sd15"].run(pipe), sequential)
        results = {}
        for k in (2, 3, STEPS + 2):
            handle.set_timeline(cache_interval=k)
            got = FAMILIES["sd15"].run(pipe)
            want = reference("sd15", handle, n=3, timeline=build_cache_timeline(
                3, min(k, STEPS), STEPS))
            assert torch.equal(got, want), k
            results[k] = got
        assert len(handle.sessions) == 1
        assert handle.executor.timeline.cache == STEPS
    assert not torch.equal(results[2], sequential) and not torch.equal(results[2], results[3])


@pytest.mark.parametrize("kwargs,message", [
    (dict(cache_interval=-1), r"^cache_interval=-1; allowed: an integer >= 0"),
    (dict(cache_interval=2), r"^strategy='balanced' with cache_interval=2; allowed: "
                             r"'shell_core'"),
    (dict(cache_interval=2, strategy="shell_core", mode="distributed"),
     r"^mode='distributed' with cache_interval=2; allowed: 'emulate'"),
    (dict(cache_interval=2, strategy="shell_core", cooldown=1),
     r"^cooldown=1 with cache_interval=2; allowed: 0"),
    (dict(cache_interval=2, strategy="shell_core", cfg_parallel=True),
     r"^cfg_parallel=True with cache_interval=2; allowed: False"),
    (dict(cache_interval=2, strategy="shell_core", n=1), r"^n=1; allowed: an integer >= 2"),
])
def test_step_cache_arguments_are_checked(kwargs, message):
    pipe, _ = pipeline("sd15")
    with pytest.raises(ValueError, match=message):
        asyncdiff.parallelize(pipe, **{"n": 2, **kwargs})
    assert "forward" not in pipe.unet.__dict__


@pytest.mark.parametrize("kwargs,message", [
    (dict(n=2, split="paper_sd15_n3"), r"^n=2; allowed: 3 \(what split='paper_sd15_n3' sets\)$"),
    (dict(n=2, split="nope"), r"^split='nope'; allowed: .*paper_sd15_n2"),
    (dict(n=2, boundaries=["mid_block"], strategy="balanced"),
     r"^strategy='balanced'; allowed: 'manual'"),
    (dict(plan="/nonexistent/plan.json"), r"^plan='/nonexistent/plan.json'; allowed: the path"),
    (dict(n=2, boundaries=["mid_block"], split="paper_sd15_n2"),
     r"^boundaries and split given; allowed: one of"),
    (dict(stride=3, n=2, stride_noise="official"), r"^stride=3 with stride_noise='official'"),
])
def test_split_arguments_are_checked(kwargs, message):
    pipe, _ = pipeline("sd15")
    with pytest.raises(ValueError, match=message):
        asyncdiff.parallelize(pipe, **kwargs)
    assert "forward" not in pipe.unet.__dict__


def test_call_split_keeps_non_tensor_entries():
    """Tensors become dotted inputs; None, flags and option dicts stay static and are merged
    back around the tensors (PixArt without size conditions passes {"resolution": None, …})."""
    import inspect

    from asyncdiff.dropin.call import bind_call, merge
    from partition.spec import nest

    def forward(sample, timestep, added_cond_kwargs=None, scale=1.0, return_dict=True):
        pass

    x, t, a = torch.zeros(1, 2), torch.tensor(5), torch.ones(3)
    call = bind_call(inspect.signature(forward), (x, t),
                     dict(added_cond_kwargs={"a": a, "b": None}, return_dict=False))
    assert list(call.tensors) == ["sample", "timestep", "added_cond_kwargs.a"]
    assert [s.role for s in call.specs()] == ["latent", "timestep", "cond"]
    assert call.static == {"added_cond_kwargs": {"b": None}, "return_dict": False}
    merged = merge(call.static, nest(call.tensors))
    assert merged["added_cond_kwargs"]["b"] is None and merged["added_cond_kwargs"]["a"] is a
    # lists and tuples (ControlNet residuals, IP-Adapter embeds, a rotary (cos, sin)) are
    # entered by index and rebuilt with their type, length and non-tensor entries
    b = torch.full((2,), 7.0)
    call = bind_call(inspect.signature(forward), (x, t),
                     dict(added_cond_kwargs={"image_embeds": [a, None, (b, "k")]}, scale=(a, b)))
    assert list(call.tensors) == ["sample", "timestep", "added_cond_kwargs.image_embeds.0",
                                  "added_cond_kwargs.image_embeds.2.0", "scale.0", "scale.1"]
    merged = merge(call.static, nest(call.tensors))
    embeds = merged["added_cond_kwargs"]["image_embeds"]
    assert type(embeds) is list and embeds[0] is a and embeds[1] is None
    assert type(embeds[2]) is tuple and embeds[2][0] is b and embeds[2][1] == "k"
    assert type(merged["scale"]) is tuple and merged["scale"][0] is a and merged["scale"][1] is b
    # a dict whose keys look like indices stays a dict; a namedtuple keeps its type
    import collections
    Pair = collections.namedtuple("Pair", "cos sin")
    call = bind_call(inspect.signature(forward), (x, t),
                     dict(added_cond_kwargs={"0": a, "1": b}, scale=Pair(a, b)))
    merged = merge(call.static, nest(call.tensors))
    kw = merged["added_cond_kwargs"]
    assert type(kw) is dict and kw.keys() == {"0", "1"} and kw["0"] is a and kw["1"] is b
    assert type(merged["scale"]) is Pair and merged["scale"].sin is b


@pytest.mark.slow
def test_runs_restart_and_shapes_recapture():
    """A new run (set_timesteps) restarts the step count; another T needs no new capture;
    another batch size is another capture."""
    pipe, _ = pipeline("pixart")
    fam = FAMILIES["pixart"]
    with asyncdiff.parallelize(pipe, n=2, warmup=1) as handle:
        first = fam.run(pipe)
        three = fam.run(pipe, steps=3)
        again = fam.run(pipe)
        assert len(handle.sessions) == 1
        assert torch.equal(again, first)
        assert torch.equal(three, reference("pixart", handle, n=2, steps=3))
        pipe(**fam.kwargs(fam.inputs), num_images_per_prompt=2, num_inference_steps=2,
             guidance_scale=GUIDANCE, height=PIXELS, width=PIXELS, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        assert len(handle.sessions) == 2


@pytest.mark.slow
def test_direct_call_answers_in_the_models_form():
    """Outside a pipeline loop: return_dict=True gets the model's output dataclass, equal to
    the eager model's (all steps warm: no staleness)."""
    pipe, _ = pipeline("pixart")
    model = pipe.transformer
    e = FAMILIES["pixart"].inputs
    pipe.scheduler.set_timesteps(2)
    kw = dict(hidden_states=e["latents"], encoder_hidden_states=e["pe"],
              timestep=pipe.scheduler.timesteps[:1],
              added_cond_kwargs={"resolution": torch.tensor([[32.0, 32.0]]),
                                 "aspect_ratio": torch.tensor([[1.0]])})
    eager = model(**kw)
    with asyncdiff.parallelize(pipe, n=2, warmup=2):
        out = model(**kw)
        # the same step again: call 1 of the step, its own stream (and, return_dict
        # being part of the call, its own capture)
        tup = model(**kw, return_dict=False)
    assert type(out) is type(eager) and torch.equal(out.sample, eager.sample)
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], eager.sample)


def test_calls_that_leave_the_timeline_and_bad_arguments_are_refused():
    pipe, _ = pipeline("sd3")
    e = FAMILIES["sd3"].inputs
    pipe.scheduler.set_timesteps(3)
    kw = dict(hidden_states=e["latents"], encoder_hidden_states=e["pe"],
              pooled_projections=e["pooled"])
    ts = pipe.scheduler.timesteps
    with asyncdiff.parallelize(pipe, n=2, warmup=1):
        pipe.transformer(**kw, timestep=ts[:1] / 1000)      # fed t / 1000: accepted
        x = pipe.scheduler.step(e["latents"], ts[0], e["latents"]).prev_sample
        pipe.scheduler.step(x, ts[1], x)                     # a step without its call
        with pytest.raises(RuntimeError, match=r"StableDiffusion3Pipeline: stream "
                                               r"\('transformer', 0\).*skipped a step"):
            pipe.transformer(**kw, timestep=ts[2:3] / 1000)
        with pytest.raises(RuntimeError, match="already parallelized"):
            asyncdiff.parallelize(pipe, n=2)
    with pytest.raises(ValueError, match="mode='gpu'; allowed: emulate, distributed"):
        asyncdiff.parallelize(pipe, n=2, mode="gpu")
    # W >= 1 when N > 1, with no upper bound: a run of T < W steps runs sequentially (the
    # drop-in learns T at each call; the command line, which knows T, allows [1, T])
    for w in (0, -1):
        with pytest.raises(ValueError, match=rf"^warmup={w}; allowed: an integer >= 1 when "
                                             r"n > 1 \(the last warm-up step seeds"):
            asyncdiff.parallelize(pipe, n=2, warmup=w)
    with asyncdiff.parallelize(pipe, n=2, warmup=100) as handle:
        assert handle.schedule.timeline(3, clamp=True).warmup == 3
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        asyncdiff.parallelize(pipe, n=2, mode="distributed")
    assert "forward" not in pipe.transformer.__dict__


# ------------------------------------------------------------------------------ torchrun

SCRIPT = """
import gc, os, sys, weakref
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
dist.init_process_group("gloo")
import asyncdiff
from asyncdiff.dropin.weights import held_elements
import test_parallelize as tp

out = {{}}
pipe, _ = tp.pipeline("sd15")          # offload="cpu": detach() restores the weights
saved = tp.snapshot(pipe.unet)
total = held_elements(pipe.unet)
handle = asyncdiff.parallelize(pipe, n=2, warmup=1, mode="distributed")
out["sd15"] = tp.FAMILIES["sd15"].run(pipe)
out["sd15_held"] = held_elements(pipe.unet) / total
handle.detach()
out["sd15_restored"] = tp.same_state(pipe.unet, saved)
out["sd15_after"] = tp.FAMILIES["sd15"].run(pipe)
pipe, _ = tp.pipeline("pixart")        # offload="drop": only this rank's stage is kept
total = held_elements(pipe.transformer)
originals = [weakref.ref(p) for p in pipe.transformer.parameters()]
handle = asyncdiff.parallelize(pipe, n=2, warmup=1, mode="distributed", offload="drop")
out["pixart"] = tp.FAMILIES["pixart"].run(pipe)
out["pixart_held"] = held_elements(pipe.transformer) / total
gc.collect()                           # the dropped weights are really gone
out["pixart_alive"] = sum(r().numel() for r in originals if r() is not None) / total
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, out)
if dist.get_rank() == 0:
    torch.save(gathered, {result!r})
dist.destroy_process_group()
"""


def torchrun(script: str, tmp_path: Path, nproc: int = 2) -> list:
    """Run ``script`` (formatted with ``tests`` and ``result``) under torchrun on ``nproc``
    ranks; return what rank 0 saved (every rank's output, gathered)."""
    result = tmp_path / "result.pt"
    path = tmp_path / "run_dropin.py"
    path.write_text(textwrap.dedent(script.format(tests=str(Path(__file__).parent),
                                                  result=str(result))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--standalone", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_equals_emulated_dropin(tmp_path):
    ranks = torchrun(SCRIPT, tmp_path)
    _, sequential = pipeline("sd15")
    sd15, pixart = dropin("sd15", 2, 1, False)["got"], dropin("pixart", 2, 1, False)["got"]
    for r, out in enumerate(ranks):  # every rank holds the same latents
        assert torch.equal(out["sd15"], sd15), r
        assert out["sd15_restored"] and torch.equal(out["sd15_after"], sequential), r
        assert torch.equal(out["pixart"], pixart), r
        assert out["sd15_held"] < 0.9 and out["pixart_held"] < 0.9, r
        assert out["pixart_alive"] == out["pixart_held"], r
