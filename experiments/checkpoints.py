"""Tiny complete diffusers pipelines with random weights, saved as a user's local checkpoints.

    asyncdiff-demo-checkpoint sd15 /tmp/sd15-tiny     # any name of conf/pipeline/
    asyncdiff-run pipeline=sd15 pipeline.path=/tmp/sd15-tiny pipeline.height=32 …

One per class of ``conf/pipeline/``: the denoiser is the zoo's tiny config of it
(``conf/model/*.yaml``; every weight drawn at random, from a fixed seed), with a tiny VAE (or
SVD's temporal one), tiny text encoders and a tokenizer, so a prompt goes the whole way:
tokenizer, text encoder(s), denoiser, scheduler, VAE decode. The images are noise; the point
is to try ``asyncdiff-run pipeline=…`` in a minute, and to test it. :func:`save` writes one
with ``save_pretrained``; :data:`CHECKPOINTS` lists the names.

The same pipelines without text encoders (prompts enter as embeddings: :func:`sd15`,
:func:`sdxl`, …) are what the drop-in's tests build. Nothing is downloaded: every tokenizer
is a byte-level CLIP tokenizer built from a vocabulary written here (256 bytes, each also as
a word end, and the two special tokens; no merges), also in the T5 slots of PixArt, SD3 and
Flux: those pipelines only call their tokenizer, and a T5 SentencePiece model cannot be made
without a download.
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from experiments import zoo

PIXELS = 32       # image height and width: the 2-level tiny VAE gives 16 × 16 latents
MAX_TOKENS = 8    # every tokenizer's model_max_length (the text encoders' positions)
VOCAB = 514       # 2 × 256 byte tokens + <|startoftext|> + <|endoftext|>


def denoiser(name: str, **overrides) -> torch.nn.Module:
    """The zoo's tiny denoiser ``name`` (``conf/model/<name>.yaml``), random weights."""
    cfg = zoo.load_yaml(name)
    return zoo.diffusers_from_config(cfg["builder"]["cls"],
                                     {**cfg["tiny"]["config"], **overrides}, seed=0)


def vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    v = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                      latent_channels=latent_channels, norm_num_groups=4, sample_size=PIXELS)
    return zoo.reinit_(v, 1).eval()


def scheduler(name: str):
    """The scheduler of the tiny pipeline ``name``: its class's released settings."""
    import diffusers

    from schedulers import make_scheduler

    if name == "sd21":  # SD 2.1's released settings, with zero terminal SNR (v-prediction)
        return diffusers.DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
            prediction_type="v_prediction", rescale_betas_zero_snr=True,
            timestep_spacing="trailing")
    if name == "svd":  # the released SVD scheduler: continuous timesteps (0.25 log σ), Karras σ
        return diffusers.EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            interpolation_type="linear", prediction_type="v_prediction",
            timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
            sigma_min=0.002, sigma_max=700.0, steps_offset=1)
    if name == "animatediff":
        return diffusers.DDIMScheduler(beta_schedule="linear", steps_offset=1,
                                       clip_sample=False)
    if name == "sd3":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    if name == "flux":
        return diffusers.FlowMatchEulerDiscreteScheduler()
    return make_scheduler({"sd15": "ddim", "sdxl": "euler", "pixart": "dpmsolver++"}[name])


# ------------------------------------------------------------ without text encoders


def sd15(sampler: str | None = None):
    """``sampler``: a name of ``schedulers.SCHEDULERS`` instead of the checkpoint's DDIM."""
    from diffusers import StableDiffusionPipeline

    from schedulers import make_scheduler

    return StableDiffusionPipeline(vae=vae(), text_encoder=None, tokenizer=None,
                                   unet=denoiser("sd15"),
                                   scheduler=make_scheduler(sampler) if sampler
                                   else scheduler("sd15"),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sd21():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae(), text_encoder=None, tokenizer=None, unet=denoiser("sd21"),
        scheduler=scheduler("sd21"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sdxl():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=vae(), text_encoder=None, text_encoder_2=None,
                                     tokenizer=None, tokenizer_2=None, unet=denoiser("sdxl"),
                                     scheduler=scheduler("sdxl"))


def sd3():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=denoiser("sd3"), vae=vae(16),
                                    scheduler=scheduler("sd3"),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def pixart():
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae(),
                               transformer=denoiser("pixart", sample_size=128),
                               scheduler=scheduler("pixart"))


def flux():
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=scheduler("flux"), vae=vae(4),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=denoiser("flux"))


def animatediff():
    from diffusers import AnimateDiffPipeline

    return AnimateDiffPipeline(vae=vae(), text_encoder=None, tokenizer=None,
                               unet=denoiser("animatediff"), motion_adapter=None,
                               scheduler=scheduler("animatediff"))


def svd():
    """Image-to-video: complete as it is (its encoder reads the conditioning image)."""
    from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline
    from transformers import (CLIPImageProcessor, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, image_size=224, patch_size=32)).eval()
    temporal_vae = zoo.reinit_(AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        latent_channels=4, layers_per_block=1, sample_size=PIXELS), 1).eval()
    return StableVideoDiffusionPipeline(
        vae=temporal_vae, image_encoder=encoder, unet=denoiser("svd"), scheduler=scheduler("svd"),
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))


# ------------------------------------------------------------ text encoders, tokenizer


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-to-character table (openai/CLIP simple_tokenizer.bytes_to_unicode)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def _vocab_dir() -> str:
    chars = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate([*chars, *(c + "</w>" for c in chars),
                                            "<|startoftext|>", "<|endoftext|>"])}
    d = tempfile.mkdtemp(prefix="asyncdiff-vocab-")
    Path(d, "vocab.json").write_text(json.dumps(vocab))
    Path(d, "merges.txt").write_text("#version: 0.2\n")
    return d


def tokenizer():
    from transformers import CLIPTokenizer

    d = _vocab_dir()
    return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", model_max_length=MAX_TOKENS)


def clip_text(hidden: int, projection: int | None = None, seed: int = 11):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=MAX_TOKENS, bos_token_id=512,
                            eos_token_id=513, pad_token_id=513,
                            projection_dim=projection or hidden)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def t5(d_model: int = 32, seed: int = 12):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=2, num_heads=2, pad_token_id=513,
                                   eos_token_id=513)).eval()


# ------------------------------------------------------------ complete pipelines


def _with(pipe, **parts):
    return type(pipe)(**{**pipe.components, **parts})


def _sd(bare):
    pipe = bare()
    return type(pipe)(**{**pipe.components, "text_encoder": clip_text(32),
                         "tokenizer": tokenizer()}, requires_safety_checker=False)


def _sdxl():
    return _with(sdxl(), text_encoder=clip_text(16),
                 text_encoder_2=clip_text(16, projection=32, seed=13), tokenizer=tokenizer(),
                 tokenizer_2=tokenizer())


def _sd3():
    pipe = sd3()
    pipe.vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE
    return _with(pipe, text_encoder=clip_text(16, projection=16),
                 text_encoder_2=clip_text(16, projection=16, seed=13), text_encoder_3=t5(32),
                 tokenizer=tokenizer(), tokenizer_2=tokenizer(), tokenizer_3=tokenizer())


def _flux():
    pipe = flux()
    pipe.vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)  # Flux's VAE
    return _with(pipe, text_encoder=clip_text(16), text_encoder_2=t5(32), tokenizer=tokenizer(),
                 tokenizer_2=tokenizer())


BUILDERS: dict[str, Callable] = {
    "sd15": lambda: _sd(sd15), "sd21": lambda: _sd(sd21), "sdxl": _sdxl, "sd3": _sd3,
    "pixart": lambda: _with(pixart(), text_encoder=t5(32), tokenizer=tokenizer()),
    "flux": _flux, "svd": svd,
    "animatediff": lambda: _with(animatediff(), text_encoder=clip_text(32),
                                 tokenizer=tokenizer())}
CHECKPOINTS: tuple[str, ...] = tuple(BUILDERS)  # the names of conf/pipeline/*.yaml


def save(name: str, root: str | Path) -> Path:
    """Build the tiny pipeline ``name`` and ``save_pretrained`` it into ``root/name``."""
    return write(name, Path(root) / name)


def write(name: str, path: str | Path) -> Path:
    """Build the tiny pipeline ``name`` and ``save_pretrained`` it into ``path``."""
    if name not in BUILDERS:
        raise ValueError(f"{name!r}: no tiny checkpoint; allowed: {', '.join(CHECKPOINTS)}")
    path = Path(path)
    BUILDERS[name]().save_pretrained(path, safe_serialization=True)
    return path


def try_command(name: str, path: str | Path) -> str:
    """The ``asyncdiff-run`` command line that runs the checkpoint at ``path`` quickly: at its
    own image size, few steps, no warm-up calls."""
    image = " pipeline.image=<an image file>" if name == "svd" else ""
    return (f"asyncdiff-run pipeline={name} pipeline.path={path} pipeline.height={PIXELS} "
            f"pipeline.width={PIXELS}{image} scheduler.steps=10 parallel.n=2 "
            "pipeline.warm_call=false")


def main(argv: list[str] | None = None) -> None:
    """Console script ``asyncdiff-demo-checkpoint NAME DIR``."""
    p = argparse.ArgumentParser(
        prog="asyncdiff-demo-checkpoint",
        description="Write a tiny diffusers pipeline with random weights (its images are "
                    "noise) to DIR, to try asyncdiff-run pipeline=NAME on it in a minute.")
    p.add_argument("name", metavar="NAME", help=f"a pipeline of conf/pipeline/: "
                                                f"{', '.join(CHECKPOINTS)}")
    p.add_argument("dir", metavar="DIR", type=Path, help="where to save it (save_pretrained)")
    p.error = lambda msg: p.exit(2, f"error: {msg} (asyncdiff-demo-checkpoint NAME DIR)\n")
    args = p.parse_args(argv)
    if args.name not in BUILDERS:
        p.exit(2, f"error: NAME={args.name!r}: unknown; allowed: {', '.join(CHECKPOINTS)}\n")
    if args.dir.exists() and (not args.dir.is_dir() or any(args.dir.iterdir())):
        p.exit(2, f"error: DIR={str(args.dir)!r}: not empty; allowed: a new or empty "
                  "directory\n")
    from experiments.generate import library_bars

    library_bars()  # transformers' "Writing model shards": on a terminal only
    torch.set_num_threads(1)
    write(args.name, args.dir)
    cls = json.loads((args.dir / "model_index.json").read_text())["_class_name"]
    print(f"wrote a tiny {cls} (random weights) to {args.dir}; try it:\n"
          f"  {try_command(args.name, args.dir)}")


if __name__ == "__main__":
    main()
