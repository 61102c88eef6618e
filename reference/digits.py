"""Reference model 1: a class-conditional, SD-style denoiser trained on handwritten digits.

[Note: digits reference model]
The denoiser is diffusers' ``UNet2DConditionModel`` in Stable Diffusion 1.5's block layout
(CrossAttnDown x3 + DownBlock2D, mid block, UpBlock2D + CrossAttnUp x3, two resnets per down
block), so the paper's SD 1.5 splits (``conf/partition/paper_sd15_n*.yaml``) apply to it
unchanged. Its config and input shapes live in ``conf/model/digits.yaml``; the ``tiny``
variant there *is* the trained model (its builder, :func:`build_unet`, loads
``assets/digits/unet.safetensors``), ``full`` is the same.

* Data: the 1,797 real 8x8 handwritten digits scikit-learn ships (``load_digits``), upsampled
  bilinearly to 16x16, scaled to [-1, 1]; the latent is the image itself, ``[B, 1, 16, 16]``.
  A stratified split by seed holds out 20 % (:func:`load_split`); both networks train on the
  rest only.
* Conditioning: cross-attention on learned class tokens. :class:`ClassTokens` is a table of
  11 x ``tokens`` x ``dim`` vectors; ``encoder_hidden_states = table[label]``. Row 10
  (:data:`NULL_CLASS`) is the unconditional token: labels are dropped to it with p ~ 0.1 in
  training, which gives classifier-free guidance (``uncond = table[10]``).
* Objective: ε-prediction under the DDPM training schedule in the YAML's ``schedule`` block
  (linear betas); every sampler must be built with the same betas:
  ``make_scheduler(name, **schedule)`` (:meth:`DigitsModel.scheduler`).
* Metric: :class:`DigitClassifier`, a small CNN trained on the same training split; its
  accuracy on the held-out split is a measured fact of ``assets/digits/digits.json``, and a
  sample "is recognised" when the classifier returns the class it was conditioned on.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from partition import zoo
from partition.spec import call_denoiser, latent_name, timestep_name
from schedulers import make_scheduler, sample

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the unconditional token's row in ClassTokens
CONDITION = "encoder_hidden_states"


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or d.get(key) is None:
        raise ValueError(f"{where}: missing required key {key!r}")
    return d[key]


def resolve(path: str | Path) -> Path:
    """A path from a YAML: relative paths are relative to the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO / path


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- networks


class ClassTokens(nn.Module):
    """The conditioning: ``tokens`` learned vectors of width ``dim`` per class, and one more
    row (:data:`NULL_CLASS`) for the unconditional prediction."""

    def __init__(self, tokens: int, dim: int, classes: int = NUM_CLASSES):
        super().__init__()
        self.table = nn.Parameter(torch.randn(classes + 1, tokens, dim))

    def forward(self, labels: Tensor) -> Tensor:
        return self.table[labels]


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


@torch.no_grad()
def classify(classifier: nn.Module, images: Tensor, batch: int = 512) -> Tensor:
    """Predicted labels of ``images`` (clamped to [-1, 1] first, as a sampler's output may
    overshoot)."""
    classifier.eval()
    images = images.clamp(-1, 1)
    return torch.cat([classifier(chunk).argmax(1) for chunk in images.split(batch)])


# --------------------------------------------------------------------------- weights


def save_weights(module: nn.Module, path: str | Path, metadata: Mapping[str, Any],
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write ``module``'s state as safetensors in ``dtype`` (fp16 halves the file; these
    networks sample the same to within fp16 rounding), with ``metadata`` as JSON strings."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={k: json.dumps(v, sort_keys=True)
                                          for k, v in metadata.items()})
    return path


def load_weights(module: nn.Module, path: str | Path,
                 expect: Mapping[str, Any] | None = None) -> nn.Module:
    """Load safetensors into ``module`` (strictly, cast to the module's dtype).

    ``expect``: metadata entries the file must carry with these values (e.g. the UNet config
    it was trained with); a mismatch is an error naming the key, not a silent half-load.
    """
    from safetensors import safe_open

    path = resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(path)!r}: no such file; train them with "
                                "`python -m experiments.train_digits`")
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise ValueError(f"{path.name}: trained with {key}={meta.get(key)!r}, but "
                             f"{value!r} was asked for; retrain or restore the {key}")
    state = load_file(str(path))
    own = module.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module


def build_unet(cls: str, config: dict, seed: int = 0, weights: str | None = None,
               pretrained: dict | None = None) -> nn.Module:
    """Zoo builder (``conf/model/digits.yaml``): the UNet from ``config`` with the shipped
    trained ``weights`` (``seed`` is then unused: the weights are the model).

    ``weights=None`` gives the untrained network with diffusers' own initialisation drawn
    from ``seed``: where training starts. The weights file records the config it was trained
    with, and a different ``config`` is an error.
    """
    if pretrained is not None:
        raise ValueError("model digits: no 'pretrained' variant; 'tiny' is the trained model")
    klass = zoo.import_object(cls)
    unknown = zoo.unknown_config_keys(klass, config)
    if unknown:
        raise ValueError(f"config: key(s) {unknown} not accepted by {cls}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = klass.from_config(dict(config))
    if weights is not None:
        load_weights(module, weights, expect={"config": dict(config)})
    return module.eval()


# --------------------------------------------------------------------------- the model


class ModuleDenoiser:
    """An eager network as a ``schedulers.Denoiser``: the plain sequential reference."""

    def __init__(self, module: nn.Module, latent: str = "sample", timestep: str = "timestep"):
        self.module, self.latent, self.timestep = module, latent, timestep

    def __call__(self, x: Tensor, t: Tensor, step: int, cond: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return call_denoiser(self.module, {self.latent: x, self.timestep: t, **cond})


@dataclass(frozen=True, eq=False)
class DigitsModel:
    """The trained reference model: denoiser bundle, class tokens, classifier, schedule."""

    bundle: zoo.ModelBundle
    tokens: ClassTokens
    classifier: DigitClassifier
    schedule: dict
    guidance: float

    @property
    def unet(self) -> nn.Module:
        return self.bundle.module

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One sample's latent shape (the YAML's latent shape without its batch)."""
        return next(s.shape for s in self.bundle.specs if s.role == "latent")[1:]

    def scheduler(self, name: str = "ddim", **kw: Any):
        """Scheduler ``name`` on the betas the model was trained with."""
        return make_scheduler(name, **{**self.schedule, **kw})

    def denoiser(self) -> ModuleDenoiser:
        return ModuleDenoiser(self.unet, latent_name(self.bundle.specs),
                              timestep_name(self.bundle.specs))

    def conditioning(self, labels: Tensor | Sequence[int]) -> tuple[dict, dict]:
        """``(cond, uncond)`` for ``schedulers.sample`` (see :func:`conditioning`)."""
        return conditioning(self.tokens, labels)

    def sample(self, labels: Tensor | Sequence[int], *, steps: int = 50,
               guidance: float | None = None, seed: int = 0, scheduler: str = "ddim") -> Tensor:
        """Images of ``labels`` from the sequential sampler (eager network), ``[n, 1, 16, 16]``."""
        return generate(self.unet, self.tokens, self.scheduler(scheduler), labels, steps=steps,
                        guidance=self.guidance if guidance is None else guidance, seed=seed,
                        image_shape=self.image_shape)

    def recognised(self, images: Tensor, labels: Tensor | Sequence[int]) -> float:
        """Fraction of ``images`` the classifier assigns to their ``labels``."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        return float((classify(self.classifier, images) == labels).float().mean())


@torch.no_grad()
def conditioning(tokens: ClassTokens, labels: Tensor | Sequence[int]) -> tuple[dict, dict]:
    """``(cond, uncond)`` for ``schedulers.sample``: ``encoder_hidden_states`` = the labels'
    tokens, and the unconditional token for each, ``[n, tokens, dim]`` each."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return ({CONDITION: tokens(labels)},
            {CONDITION: tokens(torch.full_like(labels, NULL_CLASS))})


def generate(unet: nn.Module, tokens: ClassTokens, scheduler, labels: Tensor | Sequence[int], *,
             steps: int, guidance: float, seed: int,
             image_shape: Sequence[int] = (1, 16, 16)) -> Tensor:
    """Sample one image per label with ``schedulers.sample`` and classifier-free guidance
    (the eager network as the denoiser), from noise drawn with ``seed``."""
    cond, uncond = conditioning(tokens, labels)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(cond[CONDITION]), *image_shape), generator=g)
    return sample(ModuleDenoiser(unet), scheduler, x_T, cond, steps=steps,
                  guidance_scale=guidance, uncond=uncond)


def evaluate(ref: DigitsModel, *, samples: int = 200, steps: int = 50,
             guidance: float | None = None, seed: int = 0, scheduler: str = "ddim",
             data_seed: int = 0, test_fraction: float = 0.2) -> dict[str, Any]:
    """The reference model's two measured facts: the classifier's accuracy on the held-out
    split, and the fraction of ``samples`` generated images (labels 0..9 cyclically) it
    recognises as their class, with per-class rates."""
    x, y = load_split("test", data_seed, test_fraction, ref.image_shape[-1])
    labels = torch.arange(samples) % NUM_CLASSES
    images = ref.sample(labels, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)
    hit = classify(ref.classifier, images) == labels
    return {
        "classifier_heldout_accuracy": float((classify(ref.classifier, x) == y).float().mean()),
        "heldout_images": len(y),
        "sample_accuracy": float(hit.float().mean()),
        "sample_accuracy_per_class": [float(hit[labels == c].float().mean())
                                      for c in range(NUM_CLASSES)],
        "samples": samples, "steps": steps, "scheduler": scheduler, "seed": seed,
        "guidance": ref.guidance if guidance is None else guidance,
    }


def class_tokens_for(cfg: dict, variant: str = "tiny") -> ClassTokens:
    """An untrained token table of the shape the model YAML's ``encoder_hidden_states`` has."""
    spec = next(s for s in cfg[variant]["inputs"] if s["name"] == CONDITION)
    return ClassTokens(tokens=spec["shape"][1], dim=spec["shape"][2])


def load(model: str | Path = "digits", variant: str = "tiny") -> DigitsModel:
    """The shipped reference model named by a model YAML (default ``conf/model/digits.yaml``)."""
    cfg = zoo.load_yaml(model)
    bundle = zoo.build(cfg, variant)
    ref = _get(cfg, "reference", "model")
    tokens = load_weights(class_tokens_for(cfg, bundle.variant),
                          _get(ref, "class_tokens", "model.reference"))
    classifier = load_weights(DigitClassifier(), _get(ref, "classifier", "model.reference"))
    return DigitsModel(bundle, tokens.eval(), classifier.eval(),
                       dict(_get(cfg, "schedule", "model")), float(ref.get("guidance", 3.0)))
