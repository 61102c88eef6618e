"""Tiny diffusers pipelines of many classes, for the drop-in's breadth tests.

Each case builds an unmodified diffusers pipeline from the zoo's tiny denoiser configs
(``conf/model/*.yaml``, ``conf/model/zoo/*.yaml``; every weight drawn at random), with no text
encoder (prompts enter as embeddings) and, where the pipeline needs one only to decode or to
read its scale factors, a tiny VAE or none. ``call(pipe, steps)`` runs it deterministically
(fixed generator, guidance on) and returns its latents. ``calls`` is how many denoiser calls
the pipeline makes per step (guidance as separate calls, a second denoiser) and ``streams``
the drop-in streams they are ([Note: drop-in steps]).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from experiments import zoo
from experiments.checkpoints import PIXELS, denoiser, vae
# the eight classes of conf/pipeline/, as the saved checkpoints are but without their text
# encoders (experiments/checkpoints.py)
from experiments.checkpoints import animatediff as _animatediff
from experiments.checkpoints import flux as _flux
from experiments.checkpoints import pixart as _pixart
from experiments.checkpoints import sd3 as _sd3
from experiments.checkpoints import sd15 as _sd15
from experiments.checkpoints import sd21 as _sd21
from experiments.checkpoints import sdxl as _sdxl
from experiments.checkpoints import svd as _svd


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def embeds(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Any]
    call: Callable[[Any, int], torch.Tensor]
    streams: tuple[tuple[str, int], ...] = (("unet", 0),)
    note: str = ""
    tags: tuple[str, ...] = field(default=())


# ------------------------------------------------------------------------------ image, UNet


def _sd_call(pipe, steps, **extra):
    return pipe(prompt_embeds=embeds(1, 8, 32), negative_prompt_embeds=embeds(1, 8, 32, seed=2),
                num_inference_steps=steps, guidance_scale=5.0, height=PIXELS, width=PIXELS,
                generator=_seed(), output_type="latent", **extra).images


def _ip_adapter():
    """SD 1.5 with an IP-Adapter of random weights loaded the way diffusers loads a
    released one (``_load_ip_adapter_weights``): image embeds enter as a list."""
    pipe = _sd15()
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    state = {"image_proj": {"proj.weight": embeds(cross * 4, 16, seed=3) * 0.1,
                            "proj.bias": torch.zeros(cross * 4),
                            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)},
             "ip_adapter": {}}
    i = 0
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        state["ip_adapter"][f"{i * 2 + 1}.to_k_ip.weight"] = embeds(hidden, cross, seed=10 + i)
        state["ip_adapter"][f"{i * 2 + 1}.to_v_ip.weight"] = embeds(hidden, cross, seed=50 + i)
        i += 1
    unet._load_ip_adapter_weights([state])
    pipe.set_ip_adapter_scale(0.6)
    return pipe


def _hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block]


def _ip_call(pipe, steps):
    image = embeds(2, 1, 16, seed=4)  # [negative, positive] x 1 image x 16 features
    return _sd_call(pipe, steps, ip_adapter_image_embeds=[image])


def _controlnet_sd():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from schedulers import make_scheduler

    unet = denoiser("zoo/sd15_controlnet")
    # the hint is downsampled 2x, as the tiny VAE downsamples the image
    controlnet = zoo.reinit_(ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16)), 2)
    return StableDiffusionControlNetPipeline(
        vae=vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet.eval(),
        scheduler=make_scheduler("dpmsolver++"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _controlnet_call(pipe, steps):
    hint = torch.rand(1, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(5))
    return _sd_call(pipe, steps, image=hint)


def _sdxl_embeds() -> dict:
    return dict(prompt_embeds=embeds(1, 8, 32), negative_prompt_embeds=embeds(1, 8, 32, seed=2),
                pooled_prompt_embeds=embeds(1, 32, seed=3),
                negative_pooled_prompt_embeds=embeds(1, 32, seed=4))


def _sdxl_call(pipe, steps):
    return pipe(**_sdxl_embeds(), num_inference_steps=steps, guidance_scale=5.0, height=PIXELS,
                width=PIXELS, generator=_seed(), output_type="latent").images


def _sdxl_img2img_heun():
    from diffusers import HeunDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        vae=vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=denoiser("sdxl", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 5 * 8),
        scheduler=HeunDiscreteScheduler(), requires_aesthetics_score=True)


def _sdxl_img2img_call(pipe, steps):
    # a refiner's call: latents in, the second half of the schedule (denoising_start), a
    # second-order scheduler (each timestep listed twice, the network called once per entry)
    start = embeds(1, 4, 16, 16, seed=6)
    return pipe(**_sdxl_embeds(), image=start, num_inference_steps=steps, denoising_start=0.5,
                guidance_scale=5.0, generator=_seed(), output_type="latent").images


def _controlnet_sdxl():
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from schedulers import make_scheduler

    unet = denoiser("sdxl")
    # the hint is downsampled 2x, as the tiny VAE downsamples the image
    controlnet = zoo.reinit_(ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16)), 2)
    return StableDiffusionXLControlNetPipeline(
        vae=vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, controlnet=controlnet.eval(), scheduler=make_scheduler("euler"))


def _controlnet_sdxl_call(pipe, steps):
    hint = torch.rand(1, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(5))
    return pipe(**_sdxl_embeds(), image=hint, num_inference_steps=steps, guidance_scale=5.0,
                height=PIXELS, width=PIXELS, generator=_seed(), output_type="latent").images


# ------------------------------------------------------------------------------ image, DiT


def _sd3_call(pipe, steps):
    return _sdxl_call(pipe, steps)


def _masked_call(pipe, steps):
    """PixArt and Sana: T5 / Gemma embeddings with their attention masks."""
    mask = torch.ones(1, 8, dtype=torch.int64)
    return pipe(prompt_embeds=embeds(1, 8, 32), negative_prompt_embeds=embeds(1, 8, 32, seed=2),
                prompt_attention_mask=mask, negative_prompt_attention_mask=mask,
                negative_prompt=None, use_resolution_binning=False, num_inference_steps=steps,
                guidance_scale=4.5, height=PIXELS, width=PIXELS, generator=_seed(),
                output_type="latent").images


def _flux_call(pipe, steps):
    # true CFG: the negative prompt is a second call per step; guidance embedding 3.5; the
    # transformer is fed t / 1000
    return pipe(prompt_embeds=embeds(1, 8, 32), pooled_prompt_embeds=embeds(1, 16, seed=3),
                negative_prompt_embeds=embeds(1, 8, 32, seed=2),
                negative_pooled_prompt_embeds=embeds(1, 16, seed=4), true_cfg_scale=4.0,
                guidance_scale=3.5, num_inference_steps=steps, height=PIXELS, width=PIXELS,
                generator=_seed(), output_type="latent").images


def _sana():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    return SanaPipeline(tokenizer=None, text_encoder=None, vae=_dc_vae(8),
                        transformer=denoiser("zoo/sana"),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _dc_vae(channels: int):
    from diffusers import AutoencoderDC

    v = AutoencoderDC(in_channels=3, latent_channels=channels, encoder_block_types="ResBlock",
                      decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8),
                      decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1),
                      decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                      decoder_qkv_multiscales=((), ()), decoder_norm_types="batch_norm",
                      decoder_act_fns="silu", scaling_factor=0.41407)
    return zoo.reinit_(v, 1).eval()


def _hunyuan_dit():
    from diffusers import DDPMScheduler, HunyuanDiTPipeline

    return HunyuanDiTPipeline(vae=vae(), text_encoder=None, tokenizer=None,
                              transformer=denoiser("zoo/hunyuan_dit"),
                              scheduler=DDPMScheduler(beta_schedule="scaled_linear",
                                                      clip_sample=False,
                                                      steps_offset=1),
                              safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=None,
                              tokenizer_2=None)


def _hunyuan_dit_call(pipe, steps):
    # the rotary embedding is a (cos, sin) tuple the pipeline passes on every call
    ones = torch.ones(1, 8, dtype=torch.int64)
    return pipe(prompt_embeds=embeds(1, 8, 16), negative_prompt_embeds=embeds(1, 8, 16, seed=2),
                prompt_embeds_2=embeds(1, 8, 32, seed=3),
                negative_prompt_embeds_2=embeds(1, 8, 32, seed=4), prompt_attention_mask=ones,
                negative_prompt_attention_mask=ones, prompt_attention_mask_2=ones,
                negative_prompt_attention_mask_2=ones, use_resolution_binning=False,
                num_inference_steps=steps, guidance_scale=5.0, height=16, width=16,
                generator=_seed(), output_type="latent").images


# ------------------------------------------------------------------------------ video


def _wan(two: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                       transformer=denoiser("zoo/wan"),
                       transformer_2=zoo.reinit_(denoiser("zoo/wan"), 7) if two else None,
                       boundary_ratio=0.5 if two else None)


def _wan_call(pipe, steps):
    # classifier-free guidance as two calls per step (conditional, then unconditional)
    return pipe(prompt_embeds=embeds(1, 12, 16), negative_prompt_embeds=embeds(1, 12, 16, seed=2),
                num_inference_steps=steps, guidance_scale=5.0, height=64, width=64,
                num_frames=5, generator=_seed(), output_type="latent").frames


def _cogvideox():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None,
                             transformer=denoiser("zoo/cogvideox"),
                             scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))


def _cogvideox_call(pipe, steps):
    return pipe(prompt_embeds=embeds(1, 8, 8), negative_prompt_embeds=embeds(1, 8, 8, seed=2),
                num_inference_steps=steps, guidance_scale=6.0, height=64, width=64,
                num_frames=5, generator=_seed(), output_type="latent").frames


def _ltx():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                       tokenizer=None, transformer=denoiser("zoo/ltx_video"))


def _ltx_call(pipe, steps):
    mask = torch.ones(1, 16, dtype=torch.bool)
    return pipe(prompt_embeds=embeds(1, 16, 16), negative_prompt_embeds=embeds(1, 16, 16, seed=2),
                prompt_attention_mask=mask, negative_prompt_attention_mask=mask,
                num_inference_steps=steps, guidance_scale=3.0, height=256, width=256,
                num_frames=9, generator=_seed(), output_type="latent").frames


def _animatediff_call(pipe, steps):
    return pipe(prompt_embeds=embeds(1, 8, 32), negative_prompt_embeds=embeds(1, 8, 32, seed=2),
                num_frames=2, num_inference_steps=steps, guidance_scale=7.5, height=PIXELS,
                width=PIXELS, generator=_seed(), output_type="latent").frames


def _svd_call(pipe, steps):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)
    return pipe(Image.fromarray(pixels), height=PIXELS, width=PIXELS, num_frames=2,
                num_inference_steps=steps, min_guidance_scale=1.0, max_guidance_scale=3.0,
                generator=_seed(), output_type="latent").frames


PIPELINES: dict[str, Case] = {c.name: c for c in [
    Case("sd15", _sd15, _sd_call),
    Case("sd21_vpred", _sd21, _sd_call, note="v-prediction, zero terminal SNR"),
    Case("sd15_ip_adapter", _ip_adapter, _ip_call,
         note="IP-Adapter: image embeds enter as a list"),
    Case("sd15_controlnet", _controlnet_sd, _controlnet_call,
         note="ControlNet residuals: a list of 12 tensors + one, new every step"),
    Case("sdxl", _sdxl, _sdxl_call),
    Case("sdxl_controlnet", _controlnet_sdxl, _controlnet_sdxl_call),
    Case("sdxl_img2img_heun", _sdxl_img2img_heun, _sdxl_img2img_call,
         note="second-order Heun; denoising_start (set_begin_index)"),
    Case("sd3", _sd3, _sd3_call, streams=(("transformer", 0),)),
    Case("pixart", _pixart, _masked_call, streams=(("transformer", 0),)),
    Case("flux_true_cfg", _flux, _flux_call, streams=(("transformer", 0), ("transformer", 1)),
         note="t / 1000; guidance embedding; true CFG as a second call"),
    Case("sana", _sana, _masked_call, streams=(("transformer", 0),)),
    Case("hunyuan_dit", _hunyuan_dit, _hunyuan_dit_call, streams=(("transformer", 0),),
         note="rotary (cos, sin) tuple"),
    Case("wan", _wan, _wan_call, streams=(("transformer", 0), ("transformer", 1)),
         note="CFG as two calls per step"),
    Case("wan22_two_experts", functools.partial(_wan, True), _wan_call,
         streams=(("transformer", 0), ("transformer", 1), ("transformer_2", 0),
                  ("transformer_2", 1)),
         note="two denoisers switched at the boundary timestep"),
    Case("cogvideox", _cogvideox, _cogvideox_call, streams=(("transformer", 0),)),
    Case("ltx", _ltx, _ltx_call, streams=(("transformer", 0),)),
    Case("animatediff", _animatediff, _animatediff_call),
    Case("svd", _svd, _svd_call, note="image-to-video; continuous timesteps (0.25 log σ)"),
]}


def built(name: str):
    """Case ``name``'s pipeline, progress bars off."""
    pipe = PIPELINES[name].build()
    pipe.set_progress_bar_config(disable=True)
    return pipe
