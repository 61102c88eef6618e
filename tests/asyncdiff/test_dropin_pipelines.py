"""The drop-in across diffusers' pipeline classes (tests/pipelines.py), and every way a
pipeline can leave the drop-in's step mapping ([Note: drop-in steps]).

For each pipeline, built with tiny random components and run for 5 steps with guidance on:

* warm-up >= T: the parallelized pipeline's latents equal the plain pipeline's bit for bit
  (invariant 2: the capture of the pipeline's own call is exact, whatever its timestep
  transform, argument pytree, streams or scheduler);
* the denoiser calls map to the streams the pipeline makes (guidance as separate calls, a
  second denoiser);
* W = 1: the run completes, finite, and differs from the sequential one (the stages really
  ran stale);
* ``detach()`` gives back the plain pipeline's latents.

The equality of W = 1 with an independent ``schedulers.sample`` + ``Emulator`` computation is
in test_parallelize.py, for the pipelines whose loop that reference can reproduce.
"""
from __future__ import annotations

import logging
import types

import pytest
import torch

import asyncdiff
from asyncdiff.dropin.steps import FedTimesteps, StepClock


import pipelines as P  # noqa: E402 (tests/pipelines.py, on the path by tests/conftest.py)

STEPS = 5


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# the pipelines that take more than a few seconds each: the full tier (make test-all)
SLOW_PIPELINES = {"svd", "animatediff", "sd15_ip_adapter", "sd15", "sdxl_controlnet",
                  "sdxl_img2img_heun", "sd21_vpred", "sdxl", "sd15_controlnet",
                  "wan22_two_experts"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PIPELINES
                                  else n for n in P.PIPELINES])
def test_pipeline_warm_equals_plain_and_stale_runs(name):
    case = P.PIPELINES[name]
    pipe = P.built(name)
    plain = case.call(pipe, STEPS)
    # every call warm: T is the run's scheduler entries (Heun: two per step), clamped to T
    handle = asyncdiff.parallelize(pipe, n=2, warmup=4 * STEPS)
    warm = case.call(pipe, STEPS)
    assert sorted(handle.streams) == sorted(case.streams)
    handle.set_timeline(warmup=1)
    stale = case.call(pipe, STEPS)
    handle.detach()
    after = case.call(pipe, STEPS)
    assert torch.equal(warm, plain)
    assert torch.isfinite(stale).all() and not torch.equal(stale, plain)
    assert torch.equal(after, plain)


@pytest.mark.slow
def test_cooldown_through_the_dropin():
    """W + C = T gives the plain pipeline bit for bit; W = 1 with a cool-down is a third
    result, neither plain nor the run without it; set_timeline changes C between runs."""
    case = P.PIPELINES["sd15"]
    pipe = P.built("sd15")
    plain = case.call(pipe, STEPS)
    handle = asyncdiff.parallelize(pipe, n=2, stride=2, warmup=1, cooldown=STEPS - 1)
    assert torch.equal(case.call(pipe, STEPS), plain)
    handle.set_timeline(cooldown=2)
    cooled = case.call(pipe, STEPS)
    handle.set_timeline(cooldown=1, sync=range(1, STEPS - 1))  # every step sequential again
    assert torch.equal(case.call(pipe, STEPS), plain)
    handle.set_timeline(cooldown=0, sync=())
    stale = case.call(pipe, STEPS)
    assert not torch.equal(cooled, plain) and not torch.equal(cooled, stale)
    with pytest.raises(ValueError, match="cooldown=-1; allowed"):
        handle.set_timeline(cooldown=-1)


def test_true_cfg_with_stride_two_predicts_the_fed_timestep_exactly():
    """Flux feeds t / 1000; with S = 2 (stride_noise='fresh') the last stage's stride copy
    needs the next step's timestep before the pipeline feeds it: it is predicted by the
    transform that reproduces every value fed so far, and each prediction is checked against
    the value the pipeline later feeds (FedTimesteps.record raises on a contradiction)."""
    case = P.PIPELINES["flux_true_cfg"]
    pipe = P.built("flux_true_cfg")
    plain = case.call(pipe, STEPS)
    with asyncdiff.parallelize(pipe, n=2, stride=2, warmup=1) as handle:
        stale = case.call(pipe, STEPS)
        fed = {key: s.fed for key, s in handle.streams.items()}
    assert torch.isfinite(stale).all() and not torch.equal(stale, plain)
    for stream in fed.values():
        assert stream.predicted, "the stride copies needed a timestep ahead of its call"
        for k, value in stream.predicted.items():
            assert torch.equal(value, stream.fed[k])
        assert torch.equal(stream.fed[1], torch.full_like(stream.fed[1], stream.taus[1]) / 1000)


@pytest.mark.slow
def test_ip_adapter_scale_changed_between_runs_is_recaptured():
    """The IP-Adapter's scale lives on the attention processors, a plain attribute a capture
    bakes in: changing it between runs (set_ip_adapter_scale) makes the drop-in capture again,
    and the parallelized pipeline follows the plain one at the new scale."""
    case = P.PIPELINES["sd15_ip_adapter"]
    pipe = P.built("sd15_ip_adapter")
    plain = case.call(pipe, 3)
    pipe.set_ip_adapter_scale(0.0)
    plain_off = case.call(pipe, 3)
    assert not torch.equal(plain, plain_off)   # the image embeds reach the network
    pipe.set_ip_adapter_scale(0.6)
    with asyncdiff.parallelize(pipe, n=2, warmup=3) as handle:
        assert torch.equal(case.call(pipe, 3), plain)
        (before,) = handle.sessions.values()
        pipe.set_ip_adapter_scale(0.0)
        assert torch.equal(case.call(pipe, 3), plain_off)
        (after,) = handle.sessions.values()     # one per call shape, replaced on a change
    assert after is not before


def test_a_capture_fallback_is_stated_and_exact(caplog):
    """CogVideoX at a size whose positional table is rebuilt inside forward cannot be
    captured by torch.export; the drop-in runs the module backend, says so in the log and the
    plan, and is still exact."""
    pipe = P.built("cogvideox")

    def call(p):
        return p(prompt_embeds=P.embeds(1, 8, 8), negative_prompt_embeds=P.embeds(1, 8, 8, seed=2),
                 num_inference_steps=3, guidance_scale=6.0, height=96, width=96, num_frames=9,
                 generator=P._seed(), output_type="latent").frames

    plain = call(pipe)
    with caplog.at_level(logging.WARNING), asyncdiff.parallelize(pipe, n=2, warmup=3) as h:
        warm = call(pipe)
        (session,) = h.sessions.values()
    assert torch.equal(warm, plain)
    assert session.plan.backend == "module"
    assert any("torch.export could not capture" in n for n in session.plan.notes)
    assert "module backend: torch.export could not capture" in caplog.text


def test_layerwise_casting_hooks_run_exactly():
    case = P.PIPELINES["sd15"]
    pipe = P.built("sd15")
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                       compute_dtype=torch.float32)
    plain = case.call(pipe, 3)
    with asyncdiff.parallelize(pipe, n=2, warmup=3):
        assert torch.equal(case.call(pipe, 3), plain)


def test_stateful_cache_hooks_are_refused_in_one_line():
    from diffusers import FasterCacheConfig

    pipe = P.built("cogvideox")
    pipe.transformer.enable_cache(FasterCacheConfig(spatial_attention_block_skip_range=2,
                                                    current_timestep_callback=lambda: 10))
    hooked = pipe.transformer.__dict__["forward"]  # diffusers' hooks replace forward
    with pytest.raises(ValueError, match=r"^CogVideoXPipeline.transformer has diffusers' "
                                         r"FasterCache on \(enable_cache\(FasterCacheConfig"
                                         r"\(…\)\)\): it keeps values between calls.*"
                                         r"pipe.transformer.disable_cache\(\)"):
        asyncdiff.parallelize(pipe, n=2)
    assert pipe.transformer.__dict__["forward"] is hooked  # nothing left half-attached
    assert "step" not in pipe.scheduler.__dict__


def _cache_configs():
    """Every stateful cache of the installed diffusers that its CacheMixin enables, with the
    arguments a tiny transformer takes: (feature, the case that has it, its config)."""
    import diffusers

    made = {"FasterCache": lambda c: c(spatial_attention_block_skip_range=2,
                                       current_timestep_callback=lambda: 10),
            "PyramidAttentionBroadcast": lambda c: c(spatial_attention_block_skip_range=2,
                                                     current_timestep_callback=lambda: 10),
            "FirstBlockCache": lambda c: c(threshold=0.2),
            "MagCache": lambda c: c(mag_ratios=[1.0] * 5, num_inference_steps=5),
            "TaylorSeerCache": lambda c: c()}
    return [pytest.param(name, "flux_true_cfg" if name == "TaylorSeerCache" else "cogvideox",
                         make, id=name)
            for name, make in made.items() if hasattr(diffusers, f"{name}Config")]


@pytest.mark.parametrize("feature,case,make", _cache_configs())
def test_a_cache_is_named_as_the_user_enabled_it(feature, case, make):
    """The refusal names the feature and the call that turned it on, not the name diffusers
    registers its hook under (``fbc_leader_block_hook``)."""
    import diffusers

    pipe = P.built(case)
    pipe.transformer.enable_cache(make(getattr(diffusers, f"{feature}Config")))
    hooks = {name for m in pipe.transformer.modules()
             for name, h in getattr(m.__dict__.get("_diffusers_hook"), "hooks", {}).items()
             if h._is_stateful}
    assert hooks, f"{feature} registered no stateful hook on {case}"
    with pytest.raises(ValueError) as err:
        asyncdiff.parallelize(pipe, n=2)
    said = str(err.value)
    assert f"has diffusers' {feature} on (enable_cache({feature}Config(…)))" in said, said
    assert not any(h in said for h in hooks), said
    assert "\n" not in said


def test_an_unknown_stateful_hook_is_named_by_its_registry_name():
    from diffusers.hooks import HookRegistry, ModelHook

    class Remember(ModelHook):
        _is_stateful = True

    pipe = P.built("cogvideox")
    block = pipe.transformer.transformer_blocks[0]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(Remember(), "remember")
    with pytest.raises(ValueError, match=r"^CogVideoXPipeline.transformer has the stateful "
                                         r"diffusers hook 'remember' \(on transformer_blocks.0\)"
                                         r": it keeps values between calls.*"
                                         r"HookRegistry.remove_hook\('remember'\)"):
        asyncdiff.parallelize(pipe, n=2)


def test_a_missing_first_denoiser_is_skipped():
    from asyncdiff.dropin.denoisers import find_denoisers

    pipe = types.SimpleNamespace(transformer=None, transformer_2=torch.nn.Linear(2, 2))
    assert find_denoisers(pipe, None) == ("transformer_2",)
    with pytest.raises(ValueError, match="no denoiser module at pipe.transformer"):
        find_denoisers(pipe, "transformer")


# ------------------------------------------------------------------------------ refusals


def test_a_pipeline_without_a_scheduler_is_refused_at_the_first_call():
    module = P.denoiser("zoo/sana")
    pipe = types.SimpleNamespace(transformer=module)
    x = torch.zeros(1, 8, 8, 8)
    with asyncdiff.parallelize(pipe, n=2):
        with pytest.raises(RuntimeError, match="SimpleNamespace: the drop-in places each "
                                               "denoiser call on a step by the pipeline's "
                                               "scheduler.*this pipeline has none"):
            module(x, encoder_hidden_states=torch.zeros(1, 8, 32), timestep=torch.ones(1))


def test_fed_timesteps_that_do_not_follow_the_scheduler_are_refused():
    one = torch.ones(2)
    fed = FedTimesteps([900.0, 600.0, 600.0, 300.0], "Pipe, stream ('unet', 0)")
    fed.record(0, one * 0.9)
    fed.record(1, one * 0.6)
    with pytest.raises(RuntimeError, match=r"steps 1 and 2 have the scheduler's timestep "
                                           r"600.0 but were fed 0.6"):
        fed.record(2, one * 0.5)
    fed = FedTimesteps([900.0, 600.0, 300.0], "Pipe, stream ('unet', 0)")
    for k, v in enumerate((0.9, 0.6)):
        fed.record(k, one * v)
    with pytest.raises(RuntimeError, match="the other way round from step 1"):
        fed.record(2, one * 0.95)


def test_fed_timestep_predictions_and_contradictions():
    taus = [999.0, 749.0, 499.0, 249.0]
    complement = FedTimesteps(taus, "Lumina2Pipeline, stream ('transformer', 0)")
    complement.record(0, 1 - torch.full((1,), 999.0) / 1000)
    complement.record(1, 1 - torch.full((1,), 749.0) / 1000)
    assert torch.equal(complement[2], 1 - torch.full((1,), 499.0) / 1000)
    with pytest.raises(RuntimeError, match="step 2 was run ahead of its call"):
        complement.record(2, torch.full((1,), 0.5))
    odd = FedTimesteps(taus, "Pipe, stream ('unet', 0)")
    odd.record(0, torch.tensor([0.3]))
    with pytest.raises(RuntimeError, match=r"follow no transform the drop-in can reproduce"):
        odd[1]


def test_a_copied_scheduler_is_not_counted_and_detach_restores_it():
    """LTX 2 deep-copies its scheduler for the audio latents; TextToVideoZero puts a copy in
    pipe.scheduler. The copy's steps are not the run's, and detach restores each scheduler."""
    import copy

    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler()
    clock = StepClock(sched, "Pipe")
    sched.set_timesteps(4)
    twin = copy.deepcopy(sched)
    x = torch.zeros(1, 4, 2, 2)
    twin.set_timesteps(7)
    twin.step(x, twin.timesteps[0], x)
    assert (clock.run, clock.steps_done, len(sched.timesteps)) == (1, 0, 4)
    sched.step(x, sched.timesteps[0], x)
    assert clock.steps_done == 1
    clock.attach(twin)   # the pipeline now holds the copy (its timesteps set: a run)
    assert "step" in twin.__dict__ and "step" not in sched.__dict__ and clock.run == 2
    twin.set_timesteps(3)
    assert clock.run == 3
    clock.detach()
    assert not {"step", "set_timesteps", "set_begin_index"} & set(twin.__dict__)
    twin.set_timesteps(5)
    assert clock.run == 3 and len(twin.timesteps) == 5


def test_a_loop_without_scheduler_steps_is_refused():
    pipe = P.built("sana")
    e = dict(encoder_hidden_states=P.embeds(1, 8, 32), timestep=torch.ones(1))
    pipe.scheduler.set_timesteps(3)
    with asyncdiff.parallelize(pipe, n=2, warmup=3):
        x = torch.zeros(1, 8, 16, 16)
        for _ in range(8):
            pipe.transformer(x, **e)
        with pytest.raises(RuntimeError, match=r"SanaPipeline: pipe.transformer called 9 times "
                                               r"without a scheduler.step"):
            pipe.transformer(x, **e)


def test_a_branch_that_changes_position_is_refused():
    """Two calls per step of two structures (the second branch's prompt is shorter); on the
    third step the first position gets the second branch's call (as if the first branch were
    skipped): the stream's structure changed, which is refused naming the input."""
    pipe = P.built("sana")
    cond, other = P.embeds(1, 8, 32), P.embeds(1, 4, 32, seed=2)
    x = torch.zeros(1, 8, 16, 16)
    pipe.scheduler.set_timesteps(4)
    ts = pipe.scheduler.timesteps
    with asyncdiff.parallelize(pipe, n=2, warmup=1):
        for k in range(2):
            pipe.transformer(x, encoder_hidden_states=cond, timestep=ts[k:k + 1])
            pipe.transformer(x, encoder_hidden_states=other, timestep=ts[k:k + 1])
            pipe.scheduler.step(x, ts[k], x)
        with pytest.raises(RuntimeError, match=r"^SanaPipeline, stream \('transformer', 0\): "
                                               r"call 2 fed 'encoder_hidden_states' "
                                               r"\[1, 4, 32\] float32, its first call "
                                               r"\[1, 8, 32\] float32: the pipeline changed "
                                               r"which branch it calls"):
            pipe.transformer(x, encoder_hidden_states=other, timestep=ts[2:3])


def test_conditioning_that_varies_across_steps_is_carried():
    """A stream's inputs may change value from step to step (a guidance schedule, a control
    signal switched on part-way): the branch check keys on structure and call order, and the
    values are each step's conditioning. Every call warm: the plain loop's ε bit for bit."""
    pipe = P.built("sana")
    # equal on the first two calls, then new (the check this replaces refused that)
    embeds = [P.embeds(1, 8, 32), P.embeds(1, 8, 32), P.embeds(1, 8, 32, seed=2),
              P.embeds(1, 8, 32, seed=3)]
    x = P.embeds(1, 8, 16, 16, seed=4)
    pipe.scheduler.set_timesteps(4)
    ts = pipe.scheduler.timesteps

    plain = [pipe.transformer(x, encoder_hidden_states=e, timestep=ts[k:k + 1],
                              return_dict=False)[0] for k, e in enumerate(embeds)]
    pipe.scheduler.set_timesteps(4)
    with asyncdiff.parallelize(pipe, n=2, warmup=4):
        warm = []
        for k, e in enumerate(embeds):
            warm.append(pipe.transformer(x, encoder_hidden_states=e, timestep=ts[k:k + 1],
                                         return_dict=False)[0])
            pipe.scheduler.step(x, ts[k], x)
    assert all(torch.equal(a, b) for a, b in zip(warm, plain))


def _controlnet_window(pipe, steps):
    """ControlNet applied on a window of the steps: outside it the residuals are scaled by
    0, so they are equal (zero) on the first calls and change when the window opens."""
    hint = torch.rand(1, 3, P.PIXELS, P.PIXELS, generator=torch.Generator().manual_seed(5))
    return P._sd_call(pipe, steps, image=hint, control_guidance_start=0.4,
                      control_guidance_end=0.8)


@pytest.mark.slow
def test_a_controlnet_window_is_conditioning_not_a_branch():
    pipe = P.built("sd15_controlnet")
    plain = _controlnet_window(pipe, STEPS)
    with asyncdiff.parallelize(pipe, n=2, warmup=STEPS) as handle:
        warm = _controlnet_window(pipe, STEPS)
        handle.set_timeline(warmup=1)
        stale = _controlnet_window(pipe, STEPS)
    assert torch.equal(warm, plain)
    assert torch.isfinite(stale).all() and not torch.equal(stale, plain)


def test_a_scheduler_stepped_irregularly_is_refused():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler()
    clock = StepClock(sched, "Pipe")
    sched.set_timesteps(4)
    clock.locate(sched.timesteps[:1])
    x = torch.zeros(1, 4, 2, 2)
    sched.step(x, sched.timesteps[0], x)
    sched._step_index += 1  # the pipeline moved the scheduler on its own
    with pytest.raises(RuntimeError, match="Pipe: the scheduler is at entry 3 of its timesteps "
                                           "after 2 step calls from entry 0"):
        sched.step(x, sched.timesteps[1], x)
    clock.detach()
    assert "step" not in sched.__dict__


@pytest.mark.slow
def test_two_experts_each_run_their_own_part_of_the_run():
    """Wan 2.2: ``transformer`` on the high-noise steps, ``transformer_2`` from the boundary
    on; each expert's streams start where it is first called and count its own steps."""
    case = P.PIPELINES["wan22_two_experts"]
    pipe = P.built("wan22_two_experts")
    with asyncdiff.parallelize(pipe, n=2, warmup=1) as handle:
        case.call(pipe, STEPS)
        first = {key: (s.first, s.k) for key, s in handle.streams.items()}
    high, low = first[("transformer", 0)], first[("transformer_2", 0)]
    assert high[0] == 0 and low[0] == high[1] and high[1] + low[1] == STEPS
    assert first[("transformer", 1)] == high and first[("transformer_2", 1)] == low
