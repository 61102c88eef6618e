"""What the reference models share: class-token conditioning, weights I/O, the zoo builder,
the sequential sampler on the eager network, and :class:`ReferenceModel`, the bundle the
demo, ``asyncdiff-run`` and the study load through a model YAML.

A model YAML of a reference model has, besides the zoo's keys, a ``schedule`` block (the DDPM
training betas; every sampler is built on them) and a ``reference`` block::

    reference:
      dataset: digits            # DATASETS key: the data and the classifier class
      class_tokens: <path>       # [classes + 1, tokens, dim]; the last row is unconditional
      classifier: <path>
      guidance: 3.0
      results: <path>            # training config and measured results (JSON)

Paths are relative to the repository root.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from experiments import zoo
from partition.spec import call_denoiser, latent_name, timestep_name
from schedulers import make_scheduler, sample

REPO = Path(__file__).resolve().parents[2]
CONDITION = "encoder_hidden_states"


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or d.get(key) is None:
        raise ValueError(f"{where}: missing required key {key!r}")
    return d[key]


def resolve(path: str | Path) -> Path:
    """A path from a YAML: relative paths are relative to the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def dataset(name: str, **kw: Any):
    """The data set ``name`` (``reference.dataset`` of a model YAML), built with ``kw``."""
    from experiments.reference import digits, patches

    known = {"digits": digits.Digits, "patches": patches.Patches}
    if name not in known:
        raise ValueError(f"reference.dataset={name!r}; allowed: {', '.join(known)}")
    return known[name](**kw)


# --------------------------------------------------------------------------- conditioning


class ClassTokens(nn.Module):
    """The conditioning: ``tokens`` learned vectors of width ``dim`` per class, and one more
    row (the last, ``null_class``) for the unconditional prediction."""

    def __init__(self, tokens: int, dim: int, classes: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(classes + 1, tokens, dim))

    @property
    def null_class(self) -> int:
        return self.table.shape[0] - 1

    def forward(self, labels: Tensor) -> Tensor:
        return self.table[labels]


@torch.no_grad()
def conditioning(tokens: ClassTokens, labels: Tensor | Sequence[int]) -> tuple[dict, dict]:
    """``(cond, uncond)`` for ``schedulers.sample``: ``encoder_hidden_states`` = the labels'
    tokens, and the unconditional token for each, ``[n, tokens, dim]`` each."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return ({CONDITION: tokens(labels)},
            {CONDITION: tokens(torch.full_like(labels, tokens.null_class))})


def class_tokens_for(cfg: dict, classes: int, variant: str = "tiny") -> ClassTokens:
    """An untrained token table of the shape the model YAML's ``encoder_hidden_states`` has."""
    spec = next(s for s in cfg[variant]["inputs"] if s["name"] == CONDITION)
    return ClassTokens(tokens=spec["shape"][1], dim=spec["shape"][2], classes=classes)


@torch.no_grad()
def classify(classifier: nn.Module, images: Tensor, batch: int = 512) -> Tensor:
    """Predicted labels of ``images`` (clamped to [-1, 1] first, as a sampler's output may
    overshoot)."""
    classifier.eval()
    images = images.clamp(-1, 1)
    return torch.cat([classifier(chunk).argmax(1) for chunk in images.split(batch)])


@torch.no_grad()
def features(classifier: nn.Sequential, images: Tensor, batch: int = 512) -> Tensor:
    """The classifier's penultimate features (the input of its last ``Linear``): the space
    the Fréchet distance is measured in, as Inception's pool features are for FID."""
    classifier.eval()
    head = len(classifier) - 1
    while not isinstance(classifier[head], nn.Linear):
        head -= 1
    body = nn.Sequential(*list(classifier)[:head])
    return torch.cat([body(chunk.clamp(-1, 1)).flatten(1).double()
                      for chunk in images.split(batch)])


# --------------------------------------------------------------------------- weights


def save_weights(module: nn.Module, path: str | Path, metadata: Mapping[str, Any],
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write ``module``'s state as safetensors in ``dtype`` (fp16 halves the file; these
    networks sample the same to within fp16 rounding), with ``metadata`` as JSON strings.
    Integer buffers (BatchNorm's counters) keep their dtype."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in module.state_dict().items()}
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
                                "`python -m experiments.train --config-name <model>`")
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
    """Zoo builder of the reference models: the UNet from ``config`` with the shipped trained
    ``weights`` (``seed`` is then unused: the weights are the model).

    ``weights=None`` gives the untrained network with diffusers' own initialisation drawn
    from ``seed``: where training starts. The weights file records the config it was trained
    with, and a different ``config`` is an error.
    """
    if pretrained is not None:
        raise ValueError("reference models have no 'pretrained' variant; 'tiny' is the "
                         "trained model")
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


def generate(unet: nn.Module, tokens: ClassTokens, scheduler, labels: Tensor | Sequence[int], *,
             steps: int, guidance: float, seed: int, image_shape: Sequence[int]) -> Tensor:
    """Sample one image per label with ``schedulers.sample`` and classifier-free guidance
    (the eager network as the denoiser), from noise drawn with ``seed``."""
    cond, uncond = conditioning(tokens, labels)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(cond[CONDITION]), *image_shape), generator=g)
    return sample(ModuleDenoiser(unet), scheduler, x_T, cond, steps=steps,
                  guidance_scale=guidance, uncond=uncond)


@dataclass(frozen=True, eq=False)
class ReferenceModel:
    """A trained reference model: denoiser bundle, class tokens, classifier, schedule, data."""

    bundle: zoo.ModelBundle
    tokens: ClassTokens
    classifier: nn.Module
    schedule: dict
    guidance: float
    data: Any  # digits.Digits | patches.Patches
    options: dict = field(default_factory=dict)  # scheduler name -> extra kwargs

    @property
    def unet(self) -> nn.Module:
        return self.bundle.module

    @property
    def num_classes(self) -> int:
        return self.tokens.null_class

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One sample's latent shape (the YAML's latent shape without its batch)."""
        return next(s.shape for s in self.bundle.specs if s.role == "latent")[1:]

    def scheduler(self, name: str = "ddim", **kw: Any):
        """Scheduler ``name`` on the betas the model was trained with (and the model's
        options for it, :func:`scheduler_kwargs`)."""
        return make_scheduler(name, **{**self.schedule, **self.options.get(name, {}), **kw})

    def denoiser(self) -> ModuleDenoiser:
        return ModuleDenoiser(self.unet, latent_name(self.bundle.specs),
                              timestep_name(self.bundle.specs))

    def conditioning(self, labels: Tensor | Sequence[int]) -> tuple[dict, dict]:
        """``(cond, uncond)`` for ``schedulers.sample`` (see :func:`conditioning`)."""
        return conditioning(self.tokens, labels)

    def sample(self, labels: Tensor | Sequence[int], *, steps: int = 50,
               guidance: float | None = None, seed: int = 0, scheduler: str = "ddim") -> Tensor:
        """Images of ``labels`` from the sequential sampler (eager network)."""
        return generate(self.unet, self.tokens, self.scheduler(scheduler), labels, steps=steps,
                        guidance=self.guidance if guidance is None else guidance, seed=seed,
                        image_shape=self.image_shape)

    def predict(self, images: Tensor) -> Tensor:
        return classify(self.classifier, images)

    def features(self, images: Tensor) -> Tensor:
        return features(self.classifier, images)

    def recognised(self, images: Tensor, labels: Tensor | Sequence[int]) -> float:
        """Fraction of ``images`` the classifier assigns to their ``labels``."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        return float((self.predict(images) == labels).float().mean())


def evaluate(ref: ReferenceModel, *, samples: int = 200, steps: int = 50,
             guidance: float | None = None, seed: int = 0,
             scheduler: str = "ddim") -> dict[str, Any]:
    """The reference model's two measured facts: the classifier's accuracy on the held-out
    set, and the fraction of ``samples`` generated images (labels 0, 1, ... cyclically) it
    recognises as their class, with per-class rates."""
    x, y = ref.data.heldout()
    labels = torch.arange(samples) % ref.num_classes
    images = ref.sample(labels, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)
    hit = ref.predict(images) == labels
    return {
        "classifier_heldout_accuracy": float((ref.predict(x) == y).float().mean()),
        "heldout_images": len(y),
        "sample_accuracy": float(hit.float().mean()),
        "sample_accuracy_per_class": [float(hit[labels == c].float().mean())
                                      for c in range(ref.num_classes)],
        "samples": samples, "steps": steps, "scheduler": scheduler, "seed": seed,
        "guidance": ref.guidance if guidance is None else guidance,
    }


def scheduler_kwargs(cfg: Mapping[str, Any], name: str) -> dict:
    """What scheduler ``name`` is built with for the model YAML ``cfg``: its training betas
    (``schedule``) and its options for that scheduler (``scheduler_options.<name>``, e.g.
    DDIM's ``clip_sample`` for a pixel-space model)."""
    return {**(cfg.get("schedule") or {}), **((cfg.get("scheduler_options") or {}).get(name) or {})}


def is_reference(cfg: Mapping[str, Any]) -> bool:
    """Whether a model YAML describes a trained reference model."""
    return isinstance(cfg.get("reference"), Mapping)


def reference_tokens(cfg: dict, variant: str | None = None) -> ClassTokens:
    """Only the shipped class tokens of the reference model ``cfg`` (a loaded model YAML)."""
    ref = _get(cfg, "reference", "model")
    variant = variant or cfg.get("variant", "tiny")
    table = load_file(str(resolve(_get(ref, "class_tokens", "model.reference"))))["table"]
    tokens = class_tokens_for(cfg, table.shape[0] - 1, variant)
    return load_weights(tokens, ref["class_tokens"]).eval()


def reference_classifier(cfg: dict) -> nn.Module:
    """Only the shipped classifier of the reference model ``cfg`` (a loaded model YAML)."""
    ref = _get(cfg, "reference", "model")
    data_cfg = _get(ref, "dataset", "model.reference")
    name = data_cfg if isinstance(data_cfg, str) else data_cfg["name"]
    from experiments.reference import digits, patches
    make = {"digits": digits.DigitClassifier, "patches": patches.PatchClassifier}
    if name not in make:
        raise ValueError(f"reference.dataset={name!r}; allowed: {', '.join(make)}")
    return load_weights(make[name](), _get(ref, "classifier", "model.reference")).eval()


def load(model: str | Path | dict = "digits", variant: str = "tiny") -> ReferenceModel:
    """The shipped reference model a model YAML describes (a name in ``conf/model/``, a path,
    or the loaded dict)."""
    cfg = model if isinstance(model, dict) else zoo.load_yaml(model)
    ref = _get(cfg, "reference", "model")
    data_cfg = _get(ref, "dataset", "model.reference")
    data_cfg = {"name": data_cfg} if isinstance(data_cfg, str) else dict(data_cfg)
    data = dataset(**data_cfg)
    bundle = zoo.build(cfg, variant)
    tokens = load_weights(class_tokens_for(cfg, data.num_classes, bundle.variant),
                          _get(ref, "class_tokens", "model.reference"))
    classifier = load_weights(data.make_classifier(),
                              _get(ref, "classifier", "model.reference"))
    return ReferenceModel(bundle, tokens.eval(), classifier.eval(),
                          dict(_get(cfg, "schedule", "model")), float(ref.get("guidance", 3.0)),
                          data, dict(cfg.get("scheduler_options") or {}))
