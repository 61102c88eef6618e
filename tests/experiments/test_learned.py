"""Learned metrics (experiments/learned.py): the skip path says why, and the computation path
runs through torchmetrics on a CLIP built here (random weights, a byte-level tokenizer):
nothing is downloaded."""
from __future__ import annotations

import pytest
import torch

from experiments import learned


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    d = tmp_path_factory.mktemp("clip")
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8)
    model = transformers.CLIPModel(cfg).eval()
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=[]))
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d, model, processor


def test_clip_score_on_a_local_model_is_torchmetrics_definition(tiny_clip):
    d, model, processor = tiny_clip
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a red square", "two cats"]
    got = learned.clip_score(images, prompts, d)
    assert isinstance(got, float)
    # CLIP score = max(mean of 100 · cos(image embedding, text embedding), 0) (torchmetrics
    # clamps the mean, not each pair)
    pixels = ((images + 1) / 2 * 255).round().to(torch.uint8)
    with torch.no_grad():
        inp = processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True)
        img = learned._pooled(model.get_image_features(inp["pixel_values"]))
        txt = learned._pooled(model.get_text_features(inp["input_ids"], inp["attention_mask"]))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert got == pytest.approx(max(float((100 * cos).mean()), 0.0), rel=1e-5)


def test_learned_metrics_with_and_without_their_networks(tiny_clip, tmp_path):
    d, _, _ = tiny_clip
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "clip").symlink_to(d, target_is_directory=True)
    got = learned.learned_metrics(x, x.flip(0), weights, prompts=["a", "b"])
    assert isinstance(got["clip_score"], float)
    assert got["fid"] == ("skipped: FID Inception weights not found at "
                          f"{weights / 'inception' / learned.INCEPTION_FILE}")
    assert got["lpips"] == _lpips_expected(x, x.flip(0))
    if isinstance(got["lpips"], float):  # the same images are at distance 0, others not
        assert learned.lpips(x, x) == 0 and got["lpips"] > 0
    none = learned.learned_metrics(x, x, tmp_path / "nowhere", prompts=["a", "b"])
    assert none["clip_score"] == f"skipped: no CLIP model at {tmp_path / 'nowhere' / 'clip'}"


def _lpips_expected(x, y):
    """What ``learned.lpips`` must give: the value, computed here the same way, where the
    network can be built (torchvision and its weights), else the reason it cannot."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except Exception as err:  # noqa: BLE001 - the same failure learned.lpips must report
        return "skipped: " + f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return float(metric(((x + 1) / 2).clamp(0, 1), ((y + 1) / 2).clamp(0, 1)))
