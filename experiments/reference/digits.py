"""Reference model 1's data: the handwritten digits scikit-learn ships.

[Note: digits reference model]
The denoiser is diffusers' ``UNet2DConditionModel`` in Stable Diffusion 1.5's block layout
(CrossAttnDown x3 + DownBlock2D, mid block, UpBlock2D + CrossAttnUp x3, two resnets per down
block), so the paper's SD 1.5 splits (``partition/paper_splits/paper_sd15_n*.yaml``) apply to it
unchanged. Its config and input shapes live in ``conf/model/digits.yaml``; the ``tiny``
variant there *is* the trained model (its builder, :func:`model.build_unet`, loads
``experiments/reference/weights/digits/unet.safetensors``), ``full`` is the same.

* Data: the 1,797 real 8x8 handwritten digits scikit-learn ships (``load_digits``), upsampled
  bilinearly to 16x16, scaled to [-1, 1]; the latent is the image itself, ``[B, 1, 16, 16]``.
  A stratified split by seed holds out 20 % (:func:`load_split`); both networks train on the
  rest only.
* Conditioning: cross-attention on learned class tokens (:class:`model.ClassTokens`, 11 x 4 x
  64; ``encoder_hidden_states = table[label]``). Row 10 is the unconditional token: labels are
  dropped to it with p ~ 0.1 in training, which gives classifier-free guidance.
* Objective: ε-prediction under the DDPM training schedule in the YAML's ``schedule`` block
  (linear betas); every sampler must be built with the same betas:
  ``make_scheduler(name, **schedule)`` (:meth:`model.ReferenceModel.scheduler`).
* Metric: :class:`DigitClassifier`, a small CNN trained on the same training split; its
  accuracy on the held-out split is a measured fact of ``weights/digits/digits.json``, and a
  sample "is recognised" when the classifier returns the class it was conditioned on.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 10
CLASSES = tuple(str(d) for d in range(NUM_CLASSES))


def load_split(split: Literal["train", "test"], seed: int = 0, test_fraction: float = 0.2,
               size: int = 16) -> tuple[Tensor, Tensor]:
    """Images ``[n, 1, size, size]`` in [-1, 1] (float32) and labels ``[n]`` (int64).

    The split is stratified by class and fixed by ``seed`` (scikit-learn's
    ``train_test_split``), so "held out" means the same 360 images everywhere.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; allowed: train, test")
    x, y = load_digits(return_X_y=True)
    idx = train_test_split(range(len(y)), test_size=test_fraction, stratify=y,
                           random_state=seed)[0 if split == "train" else 1]
    images = torch.as_tensor(x[idx], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.as_tensor(y[idx], dtype=torch.int64)


class DigitClassifier(nn.Sequential):
    """A small CNN on ``[n, 1, 16, 16]`` images in [-1, 1]; returns 10 logits."""

    def __init__(self, width: int = 16):
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),          # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 4x4
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 16, 128), nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )


class Digits:
    """The data set as the trainer and the study see it (``reference.dataset: digits``)."""

    classes = CLASSES
    num_classes = NUM_CLASSES

    def __init__(self, seed: int = 0, test_fraction: float = 0.2, size: int = 16):
        self.seed, self.test_fraction, self.size = seed, test_fraction, size
        self._train = load_split("train", seed, test_fraction, size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.size, self.size)

    def make_classifier(self) -> nn.Module:
        return DigitClassifier()

    def train_set(self) -> tuple[Tensor, Tensor]:
        """The 1,437 training images: the classifier's training data."""
        return self._train

    def heldout(self) -> tuple[Tensor, Tensor]:
        """The 360 held-out images: the classifier's test set."""
        return load_split("test", self.seed, self.test_fraction, self.size)

    def batch(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` training images drawn with replacement."""
        x, y = self._train
        idx = torch.randint(0, len(y), (n,), generator=g)
        return x[idx], y[idx]

    def real(self, n: int, index: int) -> Tensor:
        """Disjoint sets of ``n`` real training images (``index`` 0, 1, ...): the reference
        set of the Fréchet distance and, with a second index, its real-vs-real floor."""
        x = self._train[0]
        if (index + 1) * n > len(x):
            raise ValueError(f"n={n}: at most {len(x) // (index + 1)} real digits per set "
                             f"for {index + 1} disjoint sets")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        return x[perm[index * n:(index + 1) * n]]
