"""The shipped patches reference model ([Note: patches reference model]): the data split keeps
held-out rows apart, the weights load through the model YAML, and sequential samples are
recognised by the shipped classifier. Nothing is trained here."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from experiments.reference import model as R
from experiments.reference import patches
from experiments import zoo


@functools.cache
def ref() -> R.ReferenceModel:
    return R.load("patches")


@pytest.mark.slow
def test_patches_are_crops_of_their_region_under_the_eight_symmetries():
    data = patches.Patches()
    x, y = data.split("test", per_class=3, seed=0)
    assert x.shape == (3 * patches.NUM_CLASSES, 3, 32, 32) and -1 <= x.min() <= x.max() <= 1
    assert torch.equal(y, torch.arange(patches.NUM_CLASSES).repeat_interleave(3))
    x2, _ = data.split("test", per_class=3, seed=0)
    assert torch.equal(x, x2)  # fixed by seed
    # every held-out patch is found, under one of the 8 symmetries, in its photograph's
    # bottom test_rows rows, and in none of the rows above them
    for patch, c in zip(x[::7], y[::7]):
        im = data.images[int(c)]
        views = [torch.rot90(patch, k, dims=(1, 2)) for k in range(4)]
        views += [v.flip(2) for v in views]  # the inverse of rot-then-flip, in some order
        hits = set()
        for v in views:
            win = im.unfold(1, 32, 1).unfold(2, 32, 1)  # [3, H-31, W-31, 32, 32]
            err = (win - v[:, None, None]).abs().amax(dim=(0, 3, 4))
            hits |= {int(r) for r in (err < 1e-6).nonzero()[:, 0]}
        assert hits and min(hits) >= im.shape[1] - data.test_rows


def test_shipped_weights_load_and_the_classifier_knows_held_out_patches():
    r = ref()
    assert (r.bundle.name, r.num_classes, r.image_shape) == ("patches", 12, (3, 32, 32))
    cfg = zoo.load_yaml("patches")
    sizes = [R.resolve(cfg["builder"]["weights"]).stat().st_size,
             R.resolve(cfg["reference"]["classifier"]).stat().st_size]
    assert max(sizes) < 20 * 2**20
    x, y = r.data.heldout()
    assert len(y) == 1200
    results = json.loads(R.resolve(cfg["reference"]["results"]).read_text())["results"]
    accuracy = r.recognised(x, y)
    assert accuracy == results["classifier_heldout_accuracy"]  # the same measurement, exactly
    assert accuracy >= 0.95


@pytest.mark.slow
def test_samples_of_the_sequential_sampler_are_recognised():
    r = ref()
    labels = torch.arange(24) % 12
    images = r.sample(labels, steps=25, seed=0)
    assert images.shape == (24, 3, 32, 32) and torch.isfinite(images).all()
    assert r.recognised(images, labels) >= PATCH_SAMPLE_FLOOR


# Measured: 0.575 of 240 samples at 50 steps (weights/patches/patches.json; per class from 0
# (coffee, hubble_deep_field, retina) to 1.0 (textures)). The floor is 0.575 less 3 binomial
# standard deviations at n = 24 (3 x 0.10), rounded down: chance is 1/12.
PATCH_SAMPLE_FLOOR = 0.25
