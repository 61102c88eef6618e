"""Reference model 2's data: 32x32 RGB patches of the photographs scikit-image ships.

[Note: patches reference model]
Each class is one photograph from ``skimage.data`` (the files inside the package; nothing is
fetched): :data:`CLASSES`, twelve of them, colour and grey (grey ones are repeated into three
channels). Each photograph is resized (anti-aliased) so its shorter side is ``side`` pixels,
then split by rows: the bottom ``test_rows`` rows are held out, the rows above them are for
training. A patch is a ``size`` x ``size`` crop inside one region, under one of the eight
flips/rotations of the square. So no held-out pixel is ever trained on, and the held-out
patches are new views of the same scene, as a generated sample of that class should be.

* Training draws fresh random patches every batch (:meth:`Patches.batch`).
* :meth:`Patches.split` gives fixed patch sets by seed: the classifier's test set, and the
  real sets the Fréchet distance compares samples with (and the real-vs-real floor).
* The conditioning, denoiser and sampler are those of the digits model
  ([Note: digits reference model]); the UNet is larger (32x32x3, attention at 16x16 and 8x8;
  ``conf/model/patches.yaml``).
"""
from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
           "immunohistochemistry", "brick", "grass", "gravel", "camera", "moon")
NUM_CLASSES = len(CLASSES)


@functools.cache
def photographs(side: int = 128) -> tuple[Tensor, ...]:
    """The photographs as ``[3, H, W]`` float32 in [-1, 1], shorter side ``side``."""
    import skimage.data

    out = []
    for name in CLASSES:
        im = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        x = torch.from_numpy(im)
        x = x[..., :3].permute(2, 0, 1) if x.ndim == 3 else x.expand(3, *x.shape)
        h, w = x.shape[1:]
        scale = side / min(h, w)
        size = (max(side, round(h * scale)), max(side, round(w * scale)))
        x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True,
                          align_corners=False)[0]
        out.append((x.clamp(0, 1) * 2 - 1).contiguous())
    return tuple(out)


def _dihedral(x: Tensor, k: Tensor) -> Tensor:
    """Apply transform ``k[i]`` in 0..7 (rotation by 90°·(k mod 4), then a flip if k ≥ 4)."""
    out = torch.empty_like(x)
    for code in range(8):
        rows = (k == code).nonzero().flatten()
        if len(rows):
            y = torch.rot90(x[rows], code % 4, dims=(2, 3))
            out[rows] = y.flip(3) if code >= 4 else y
    return out


class Patches:
    """Patch sampler over the photographs, with a fixed train/test split by rows."""

    classes = CLASSES
    num_classes = NUM_CLASSES

    def __init__(self, size: int = 32, side: int = 128, test_rows: int = 40):
        if test_rows < size:
            raise ValueError(f"test_rows={test_rows} must be >= size={size}")
        self.size, self.side, self.test_rows = size, side, test_rows
        self.images = photographs(side)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def _crops(self, labels: Tensor, split: str, g: torch.Generator) -> Tensor:
        s = self.size
        out = torch.empty(len(labels), 3, s, s)
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().flatten()
            im = self.images[c]
            h, w = im.shape[1:]
            top, bottom = (0, h - self.test_rows) if split == "train" else (h - self.test_rows, h)
            ys = torch.randint(top, bottom - s + 1, (len(rows),), generator=g)
            xs = torch.randint(0, w - s + 1, (len(rows),), generator=g)
            out[rows] = torch.stack([im[:, y:y + s, x:x + s] for y, x in
                                     zip(ys.tolist(), xs.tolist())])
        return _dihedral(out, torch.randint(0, 8, (len(labels),), generator=g))

    def batch(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` fresh training patches ``[n, 3, size, size]`` with uniform random classes."""
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        return self._crops(labels, "train", g), labels

    def split(self, split: Literal["train", "test"], per_class: int = 100,
              seed: int = 0) -> tuple[Tensor, Tensor]:
        """A fixed set: ``per_class`` patches of each class from region ``split``, drawn with
        ``seed`` (classes in order 0, 1, ..., each ``per_class`` times)."""
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}; allowed: train, test")
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        g = torch.Generator().manual_seed(seed)
        return self._crops(labels, split, g), labels


    # ---- what the trainer and the study ask of a data set (as digits.Digits)

    def make_classifier(self) -> nn.Module:
        return PatchClassifier()

    def train_set(self, per_class: int = 1000) -> tuple[Tensor, Tensor]:
        """Fixed training patches: the classifier's training data."""
        return self.split("train", per_class, seed=1)

    def heldout(self, per_class: int = 100) -> tuple[Tensor, Tensor]:
        """Held-out patches (the bottom rows): the classifier's test set."""
        return self.split("test", per_class, seed=0)

    def real(self, n: int, index: int) -> Tensor:
        """Sets of ``n`` real training-region patches, classes balanced as the study's
        samples are (labels 0, 1, ... cyclically); ``index`` picks an independent draw."""
        labels = torch.arange(n) % NUM_CLASSES
        return self._crops(labels, "train", torch.Generator().manual_seed(100 + index))


class PatchClassifier(nn.Sequential):
    """A small CNN on ``[n, 3, 32, 32]`` patches in [-1, 1]; returns one logit per class."""

    def __init__(self, width: int = 32, classes: int = NUM_CLASSES):
        super().__init__(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),                                                       # 16x16
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),                                                       # 8x8
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),                                 # features
            nn.Dropout(0.2), nn.Linear(4 * width, classes),
        )
