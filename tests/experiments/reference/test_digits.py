"""The shipped digits reference model ([Note: digits reference model]): it loads through its
model YAML, keeps SD 1.5's layout, samples with its training betas, and its samples are
recognised by the shipped classifier. Nothing is trained here."""
from __future__ import annotations

import functools

import pytest
import torch
from diffusers import DDPMScheduler

from experiments import zoo
from experiments.reference import digits
from experiments.reference import model as R
from partition import splits


@functools.cache
def ref() -> R.ReferenceModel:
    return R.load("digits")


def test_shipped_weights_load_through_the_model_yaml():
    r = ref()
    assert (r.bundle.name, r.bundle.variant) == ("digits", "tiny")
    assert all(p.dtype == torch.float32 for p in r.unet.parameters())
    assert r.tokens.table.shape == (digits.NUM_CLASSES + 1, 4, 64)
    assert r.image_shape == (1, 16, 16)
    cfg = zoo.load_yaml("digits")
    files = [cfg["builder"]["weights"], *(cfg["reference"][k] for k in ("class_tokens",
                                                                       "classifier"))]
    sizes = [R.resolve(f).stat().st_size for f in files]
    assert max(sizes) < 10 * 2**20  # fp16: a few MB
    # The weights are the model: the zoo's seed does not change them.
    a, b = (zoo.build(cfg, seed=s).module.state_dict() for s in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", [n for n in splits.names() if n.startswith("paper_sd15_")])
def test_paper_sd15_splits_name_modules_of_the_digits_unet(name):
    boundaries = splits.named(name).options["boundaries"]
    modules = dict(ref().unet.named_modules())
    assert [b for b in boundaries if b not in modules] == []


def test_builder_refuses_a_config_the_weights_were_not_trained_with():
    cfg = zoo.load_yaml("digits")
    cfg["tiny"]["config"]["norm_num_groups"] = 16
    with pytest.raises(ValueError, match="unet.safetensors: trained with config="):
        zoo.build(cfg)


def test_missing_weights_name_the_file_and_the_trainer(tmp_path):
    cfg = zoo.load_yaml("digits")
    cfg["builder"]["weights"] = str(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="none.safetensors.*experiments.train"):
        zoo.build(cfg)


def test_samplers_use_the_training_betas():
    r = ref()
    train = DDPMScheduler(**r.schedule).alphas_cumprod
    for name in ("ddim", "dpmsolver++", "euler"):
        assert torch.equal(r.scheduler(name).alphas_cumprod, train), name
    assert r.schedule["beta_schedule"] == "linear"  # not the SD default make_scheduler has


def test_heldout_split_is_fixed_by_seed_and_the_classifier_passes():
    x, y = digits.load_split("test", seed=0)
    x2, y2 = digits.load_split("test", seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (360, 1, 16, 16) and len(digits.load_split("train", seed=0)[1]) == 1437
    assert torch.bincount(y).min() >= 35  # stratified: every class held out
    assert -1 <= float(x.min()) and float(x.max()) <= 1
    accuracy = ref().recognised(x, y)
    assert accuracy >= 0.98  # measured 0.99 (weights/digits/digits.json)


@pytest.mark.slow
def test_samples_of_the_sequential_sampler_are_recognised():
    r = ref()
    labels = torch.arange(20) % digits.NUM_CLASSES
    images = r.sample(labels, steps=25, guidance=r.guidance, seed=0)
    assert images.shape == (20, 1, 16, 16) and torch.isfinite(images).all()
    assert r.recognised(images, labels) >= 0.95  # measured 1.0 over 200 samples, 50 steps
