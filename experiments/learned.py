"""Learned image metrics through torchmetrics: LPIPS, CLIP score, FID on Inception.

Each needs a pretrained network and computes wherever one is on the machine; nothing is ever
downloaded. Where it cannot run the metric is recorded as ``"skipped: <reason>"`` with the
actual reason (a package that will not import, weights not found where they were looked for,
a run that holds latents and no decoded images).

Where the networks are looked for, under ``metrics.weights_dir`` (``W``):

* LPIPS: torchvision's ImageNet backbone in torch's hub cache (``$TORCH_HOME``), as torchvision
  loads it; the LPIPS heads ship inside torchmetrics. Needs ``torchvision``.
* CLIP score: a CLIP model directory (``config.json``, weights, tokenizer and processor files,
  as ``save_pretrained`` writes them) at ``W/clip``. Needs ``transformers``.
* FID on Inception: the FID Inception weights file at ``W/inception/weights-inception-2015-12-05-6726825d.pth``
  (torch-fidelity's file). Needs ``torch-fidelity`` (and so ``torchvision``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _skipped(err: BaseException | str) -> str:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return f"skipped: {text.strip().splitlines()[0]}"


def _to_unit(images: Tensor) -> Tensor:
    """Images in [-1, 1] (the pipelines' and the reference models' range) to [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def lpips(x: Tensor, ref: Tensor, net: str = "alex") -> float | str:
    """Mean LPIPS of RGB images ``x`` against ``ref`` (both ``[n, 3, H, W]`` in [-1, 1])."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    except Exception as err:  # noqa: BLE001 - an import or weights failure is the reason
        return _skipped(err)
    return float(metric(_to_unit(x), _to_unit(ref)))


def clip_score(images: Tensor, prompts: list[str], model_dir: str | Path) -> float | str:
    """Mean CLIP score of RGB images (``[n, 3, H, W]`` in [-1, 1]) against their prompts,
    with the CLIP model saved at ``model_dir``."""
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        return _skipped(f"no CLIP model at {model_dir}")
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        class Projected(CLIPModel):
            """transformers >= 5 returns an output object from get_*_features where
            torchmetrics expects the projected embeddings (its pooler_output)."""

            def get_image_features(self, *args, **kwargs):
                return _pooled(super().get_image_features(*args, **kwargs))

            def get_text_features(self, *args, **kwargs):
                return _pooled(super().get_text_features(*args, **kwargs))

        def local():  # torchmetrics takes a loader for a model it does not name
            return (Projected.from_pretrained(model_dir, local_files_only=True),
                    CLIPProcessor.from_pretrained(model_dir, local_files_only=True))
        metric = CLIPScore(model_name_or_path=local)
    except Exception as err:  # noqa: BLE001 - an import or weights failure is the reason
        return _skipped(err)
    pixels = (_to_unit(images) * 255).round().to(torch.uint8)
    with torch.no_grad():
        return float(metric(list(pixels), prompts))


def _pooled(out):
    return out if isinstance(out, Tensor) else out.pooler_output


def fid_inception(images: Tensor, ref: Tensor, weights_dir: str | Path) -> float | str:
    """FID of RGB images against reference images (both ``[n, 3, H, W]`` in [-1, 1]) on the
    FID Inception network, from its weights file under ``weights_dir``."""
    path = Path(weights_dir).expanduser() / INCEPTION_FILE
    if not path.is_file():
        return _skipped(f"FID Inception weights not found at {path}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        metric = FrechetInceptionDistance(feature=2048, normalize=True,
                                          feature_extractor_weights_path=str(path))
    except Exception as err:  # noqa: BLE001 - an import or weights failure is the reason
        return _skipped(err)
    metric.update(_to_unit(ref), real=True)
    metric.update(_to_unit(images), real=False)
    return float(metric.compute())


def learned_metrics(x: Tensor | None, ref: Tensor | None, weights_dir: str | Path | None,
                    prompts: list[str] | None = None) -> dict[str, float | str]:
    """LPIPS, CLIP score and FID of decoded images ``x`` against ``ref``, or why each is not
    computed (``x`` None: the run holds latents only)."""
    if x is None:
        why = _skipped("needs decoded RGB images; this run has latents only (no VAE)")
        return {"lpips": why, "clip_score": why, "fid": why}
    root = Path(weights_dir).expanduser() if weights_dir else Path("~/.cache/asyncdiff/weights")
    out: dict[str, float | str] = {"lpips": lpips(x, ref)}
    out["clip_score"] = clip_score(x, prompts, root / "clip") if prompts else \
        _skipped("no prompts")
    out["fid"] = fid_inception(x, ref, root / "inception") if len(x) >= 2 else \
        _skipped("FID needs at least 2 images")
    return out
