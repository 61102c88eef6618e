"""Tiny complete diffusers pipelines saved on disk, as a user's local checkpoints are.

The pipelines of ``tests/pipelines.py`` hold no text encoder (prompts enter as embeddings);
these add tiny ones, so a prompt goes the whole way: tokenizer, text encoder(s), denoiser,
scheduler, VAE decode. ``save(name, root)`` writes one with ``save_pretrained`` and returns
its directory; :data:`CHECKPOINTS` lists the names (the ``conf/pipeline/*.yaml`` names).

Nothing is downloaded. Every tokenizer is a byte-level CLIP tokenizer built from a vocabulary
written here (256 bytes, each also as a word end, and the two special tokens; no merges), also
in the T5 slots of PixArt, SD3 and Flux: those pipelines only call their tokenizer, and a T5
SentencePiece model cannot be made without a download.
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch

import pipelines as P  # tests/pipelines.py (tests/ is on the path: tests/conftest.py)

MAX_TOKENS = 8    # every tokenizer's model_max_length (the text encoders' positions)
VOCAB = 514       # 2 x 256 byte tokens + <|startoftext|> + <|endoftext|>


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


def _sd(variant):
    pipe = variant()
    return type(pipe)(**{**pipe.components, "text_encoder": clip_text(32),
                         "tokenizer": tokenizer()}, requires_safety_checker=False)


def _sdxl():
    pipe = P._sdxl()
    return type(pipe)(**{**pipe.components, "text_encoder": clip_text(16),
                         "text_encoder_2": clip_text(16, projection=32, seed=13),
                         "tokenizer": tokenizer(), "tokenizer_2": tokenizer()})


def _sd3():
    pipe = P._sd3()
    pipe.vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE
    return type(pipe)(**{**pipe.components, "text_encoder": clip_text(16, projection=16),
                         "text_encoder_2": clip_text(16, projection=16, seed=13),
                         "text_encoder_3": t5(32), "tokenizer": tokenizer(),
                         "tokenizer_2": tokenizer(), "tokenizer_3": tokenizer()})


def _pixart():
    pipe = P._pixart()
    return type(pipe)(**{**pipe.components, "text_encoder": t5(32), "tokenizer": tokenizer()})


def _flux():
    pipe = P._flux()
    pipe.vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)  # Flux's VAE
    return type(pipe)(**{**pipe.components, "text_encoder": clip_text(16),
                         "text_encoder_2": t5(32), "tokenizer": tokenizer(),
                         "tokenizer_2": tokenizer()})


def _animatediff():
    pipe = P._animatediff()
    return type(pipe)(**{**pipe.components, "text_encoder": clip_text(32),
                         "tokenizer": tokenizer()})


BUILDERS = {"sd15": lambda: _sd(P._sd15), "sd21": lambda: _sd(P._sd21), "sdxl": _sdxl,
            "sd3": _sd3, "pixart": _pixart, "flux": _flux, "svd": P._svd,
            "animatediff": _animatediff}
CHECKPOINTS: tuple[str, ...] = tuple(BUILDERS)


def save(name: str, root: str | Path) -> Path:
    """Build the tiny pipeline ``name`` and ``save_pretrained`` it into ``root/name``."""
    path = Path(root) / name
    pipe = BUILDERS[name]()
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def pixels() -> int:
    """Height and width of the tiny pipelines' images (their VAE downsamples 2x)."""
    return P.PIXELS


