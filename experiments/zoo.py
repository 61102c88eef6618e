"""The model zoo: one YAML file per architecture (``conf/model/<name>.yaml``) and the plain
builder that turns it into a module with example inputs.

A model YAML holds, per *variant* (``tiny`` random weights for tests, ``full`` the released
architecture with random weights, ``pretrained`` the released weights from the local cache),
the constructor config and the ordered input specs (:class:`partition.spec.InputSpec`).
``builder._target_`` names any importable callable
``(cls=..., config=..., seed=..., pretrained=None, **other builder keys) -> nn.Module``, so a
new architecture is one YAML file (STYLE 4); no Hydra is needed to read it (STYLE 5).

The denoiser's call and output are declared by the optional ``contract`` block of the YAML
(:class:`partition.contract.DenoiserContract`, [Note: denoiser contract]): SVD's image latents
concatenated to the latent, a learned-σ half, Flux's t / 1000, fixed keyword arguments. The
module itself is the released class, untouched: module paths and state-dict keys are the
released model's, so a manual split written against them applies.

Weights are re-drawn by :func:`reinit_` so that no output is identically zero (diffusers
zero-initialises some output layers, which makes every equality test vacuous; docs/design.md §2).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from experiments.common import conf_dir
from partition.plan import architecture_hash
from partition.contract import DenoiserContract
from partition.spec import InputSpec, call_denoiser, latent_name, timestep_name

MODEL_DIR = conf_dir() / "model"
VARIANTS: tuple[str, ...] = ("tiny", "full", "pretrained")
INIT_KINDS: tuple[str, ...] = ("randn", "timestep", "randint:<high>", "zeros", "ones",
                               "ids2d:<h>:<w>", "ids_zeros", "arange",
                               "segments:<value>x<count>,...")


# --------------------------------------------------------------------------- YAML


def model_names() -> list[str]:
    """Names of the YAML files in ``conf/model/``."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def zoo_names() -> list[str]:
    """``zoo/<name>`` for every tiny config in ``conf/model/zoo/`` (one per denoiser class
    diffusers ships; docs/breadth.md)."""
    return sorted(f"zoo/{p.stem}" for p in (MODEL_DIR / "zoo").glob("*.yaml"))


def load_yaml(name_or_path: str | Path) -> dict:
    """Read a model YAML: a name looks in ``conf/model/`` (``zoo/wan``: in its ``zoo/``),
    anything ending in ``.yaml`` is a path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODEL_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"model={name_or_path!r}: unknown; "
                             f"allowed: {', '.join(model_names())} (and zoo/<name>: "
                             f"{len(zoo_names())} more)")
    elif not path.is_file():
        raise ValueError(f"model={str(name_or_path)!r}: no such file")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"model={str(name_or_path)!r}: {path} is not a YAML mapping")
    return cfg


def _require(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d or d[key] is None:
        raise ValueError(f"{where}: missing required key {key!r}")
    return d[key]


def _section(variant: str) -> str:
    """The YAML section a variant reads its config and inputs from."""
    return "full" if variant == "pretrained" else variant


def validate(cfg: dict, variant: str | None = None) -> str:
    """Check the fields :func:`build` needs; return the resolved variant.

    Raises ``ValueError`` naming the missing or bad key (``model.<key>``).
    """
    _require(cfg, "name", "model")
    builder = _require(cfg, "builder", "model")
    _require(builder, "_target_", "model.builder")
    variant = variant if variant is not None else cfg.get("variant", "tiny")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: unknown; allowed: {', '.join(VARIANTS)}")
    if variant == "pretrained":
        _require(_require(cfg, "pretrained", "model"), "id", "model.pretrained")
    section = _require(cfg, _section(variant), "model")
    _require(section, "config", f"model.{_section(variant)}")
    where = f"model.{_section(variant)}.inputs"
    inputs = _require(section, "inputs", f"model.{_section(variant)}")
    if not isinstance(inputs, list):
        raise ValueError(f"{where}: must be a list of input specs")
    for i, d in enumerate(inputs):
        _require(d, "name", f"{where}[{i}]")
        _require(d, "shape", f"{where}[{i}]")
    specs = [InputSpec.from_dict(d) for d in inputs]
    try:
        latent_name(specs)
        timestep_name(specs)
    except ValueError as e:
        raise ValueError(f"model.{_section(variant)}.{e}") from None
    contract = DenoiserContract.from_config(cfg.get("contract"))
    missing = [n for n in contract.concat_inputs if n not in {s.name for s in specs}]
    if missing:
        raise ValueError(f"model.contract.concat.inputs: {missing} are not inputs of "
                         f"model.{_section(variant)}.inputs")
    return variant


# --------------------------------------------------------------------------- builders


def import_object(path: str) -> Any:
    """``"pkg.mod.Name"`` -> the object (the ``_target_`` convention, without Hydra)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"_target_={path!r}: not a dotted path 'module.name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"_target_={path!r}: cannot import ({e})") from None


def unknown_config_keys(cls: type, config: dict) -> list[str]:
    """Keys of ``config`` that ``cls.__init__`` does not take (diffusers only warns on them)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    return sorted(k for k in config if not k.startswith("_") and k not in params)


def _from_pretrained(cls: type, pretrained: dict) -> nn.Module:
    kwargs = {k: v for k, v in pretrained.items() if k not in ("id",)}
    try:
        return cls.from_pretrained(pretrained["id"], local_files_only=True, **kwargs)
    except (OSError, EnvironmentError, ValueError) as e:
        raise FileNotFoundError(
            f"pretrained={pretrained}: not in the local Hugging Face cache and downloads are "
            f"off; fetch it beforehand or pick variant=tiny|full ({type(e).__name__}: {e})"
        ) from None


def diffusers_from_config(cls: str, config: dict, seed: int = 0,
                          pretrained: dict | None = None) -> nn.Module:
    """Build a diffusers model class (dotted path) from its config with random weights.

    With ``pretrained={id, subfolder, ...}`` the released weights are loaded from the local
    cache instead (no re-initialisation, no download). Unknown config keys are an error.
    """
    klass = import_object(cls)
    if pretrained is not None:
        return _from_pretrained(klass, pretrained).eval()
    unknown = unknown_config_keys(klass, config)
    if unknown:
        raise ValueError(f"config: key(s) {unknown} not accepted by {cls}")
    module = klass.from_config(dict(config))
    reinit_(module, seed)
    return module.eval()


def unet_motion_from_config(cls: str, config: dict, seed: int = 0,
                            pretrained: dict | None = None) -> nn.Module:
    """:func:`diffusers_from_config`, except that AnimateDiff's released weights come in two
    parts: ``pretrained={id, subfolder}`` is an SD-1.5-style UNet and
    ``pretrained.motion_adapter`` the motion-module repository; they are merged by
    ``UNetMotionModel.from_unet2d``."""
    if pretrained is None:
        return diffusers_from_config(cls, config, seed)
    from diffusers import MotionAdapter, UNet2DConditionModel

    base = {k: v for k, v in pretrained.items() if k != "motion_adapter"}
    unet = _from_pretrained(UNet2DConditionModel, base)
    adapter = _from_pretrained(MotionAdapter, {"id": _require(
        pretrained, "motion_adapter", "model.pretrained")})
    return import_object(cls).from_unet2d(unet, adapter).eval()


# --------------------------------------------------------------------------- weights


_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def reinit_(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter and floating buffer, deterministically from ``seed``.

    Scales keep activations O(1) through the network: weights with ≥ 2 dims get
    N(0, 1/fan_in) (fan_in = numel / out-dim), embedding tables N(0, 1), norm (and other
    1-d "scale" parameters named ``weight``) 1 + N(0, 0.1²), biases and other 1-d
    parameters N(0, 0.1²), and floating buffers a normal draw with the buffer's own mean
    and spread (so a sin-cos table stays a table of values in about [-1, 1]).
    Integer buffers (counters, indices) are left alone.
    """
    g = torch.Generator().manual_seed(int(seed))

    def draw(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_((torch.randn(t.shape, generator=g, dtype=torch.float64) * std + mean).to(t.dtype))

    for mod in module.modules():
        is_norm = isinstance(mod, _NORMS) or "norm" in type(mod).__name__.lower()
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.Embedding) and name == "weight":
                draw(p, 1.0)
            elif p.dim() >= 2:
                draw(p, 1.0 / math.sqrt(max(1, p.numel() // p.shape[0])))
            elif name == "weight" and is_norm:
                draw(p, 0.1, 1.0)
            else:
                draw(p, 0.1)
        for _, b in mod.named_buffers(recurse=False):
            if b is None or not b.is_floating_point():
                continue
            spread = float(b.float().std()) if b.numel() > 1 else 0.0
            draw(b, spread if spread > 0 else 1.0, float(b.float().mean()) if b.numel() else 0.0)
    return module


# --------------------------------------------------------------------------- inputs


def example_inputs(specs: list[InputSpec] | tuple[InputSpec, ...],
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """One example value per spec, in spec order, drawn deterministically from ``seed``.

    ``timestep`` is one integer value in [0, 1000) filled into the whole shape (every
    batch row shares the step, as in a sampler); ``randint:K`` is int64 in [0, K) unless the
    spec's dtype is an integer type; ``ids2d:h:w`` are Flux image ids ``[h*w, 3]`` with
    (0, row, col) rows; ``ids_zeros`` are Flux text ids; ``arange`` is 0, 1, … along the last
    dimension (position ids); ``segments:2x64,3x8`` fills the last dimension with runs of
    values (64 twos, then 8 threes: a token-type indicator or a text/image mask).
    """
    g = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for s in specs:
        dtype = getattr(torch, s.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"input {s.name!r}: dtype={s.dtype!r} is not a torch dtype")
        kind, *args = s.init.split(":")
        if kind == "randn" and not args:
            v = torch.randn(s.shape, generator=g, dtype=torch.float32).to(dtype)
        elif kind == "timestep" and not args:
            t = float(torch.randint(0, 1000, (), generator=g))
            v = torch.full(s.shape, t, dtype=dtype)
        elif kind == "randint" and len(args) == 1:
            itype = torch.int64 if dtype.is_floating_point else dtype
            v = torch.randint(0, int(args[0]), s.shape, generator=g, dtype=itype)
        elif kind in ("zeros", "ids_zeros") and not args:
            v = torch.zeros(s.shape, dtype=dtype)
        elif kind == "ones" and not args:
            v = torch.ones(s.shape, dtype=dtype)
        elif kind == "ids2d" and len(args) == 2:
            h, w = int(args[0]), int(args[1])
            if s.shape != (h * w, 3):
                raise ValueError(f"input {s.name!r}: init={s.init!r} needs shape [{h * w}, 3], "
                                 f"got {list(s.shape)}")
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            v = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(h * w, 3).to(dtype)
        elif kind == "arange" and not args:
            v = torch.arange(s.shape[-1]).to(dtype).expand(s.shape).clone()
        elif kind == "segments" and len(args) == 1:
            runs = [r.split("x") for r in args[0].split(",")]
            row = torch.cat([torch.full((int(n),), float(val)) for val, n in runs])
            if not s.shape or row.numel() != s.shape[-1]:
                raise ValueError(f"input {s.name!r}: init={s.init!r} makes {row.numel()} values "
                                 f"along the last dimension; its shape is {list(s.shape)}")
            v = row.to(dtype).expand(s.shape).clone()
        else:
            raise ValueError(f"input {s.name!r}: init={s.init!r}; allowed: {', '.join(INIT_KINDS)}")
        out[s.name] = v
    return out


# --------------------------------------------------------------------------- bundle


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A built denoiser with its input specs; what the compiler and the runtime start from.

    ``config_hash`` identifies the architecture and input shapes (sha256 of the canonical
    JSON of the builder, contract and chosen variant's section), not the seed: a plan made
    on one set of random weights is valid for another.
    """

    name: str
    variant: str
    module: nn.Module
    specs: tuple[InputSpec, ...]
    config_hash: str
    contract: DenoiserContract = DenoiserContract()

    @property
    def latent(self) -> str:
        return latent_name(self.specs)

    @property
    def architecture(self) -> str:
        """What a plan records as its ``config_hash``: the module's class and config as the
        drop-in records them (so the same split of the same model hashes the same either
        way), or ``config_hash`` for a model without a config."""
        return architecture_hash(self.module) or self.config_hash

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """ε of the eager model on named inputs, through its contract."""
        return call_denoiser(self.module, inputs, self.contract, self.specs)

    def inputs(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Example inputs for this model (see :func:`example_inputs`)."""
        return example_inputs(self.specs, seed)


def config_hash(cfg: dict, variant: str) -> str:
    """sha256 of the canonical JSON of what determines the built architecture."""
    payload = {"builder": cfg["builder"], "contract": cfg.get("contract") or {},
               "variant": variant, _section(variant): cfg[_section(variant)]}
    if variant == "pretrained":
        payload["pretrained"] = cfg["pretrained"]
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def build(cfg: dict, variant: str | None = None, seed: int = 0) -> ModelBundle:
    """Build the model a YAML dict describes (``variant`` overrides ``cfg['variant']``)."""
    variant = validate(cfg, variant)
    section = cfg[_section(variant)]
    specs = tuple(InputSpec.from_dict(d) for d in section["inputs"])
    kwargs = {k: v for k, v in cfg["builder"].items() if k != "_target_"}
    kwargs.update(config=section["config"], seed=seed)
    if variant == "pretrained":
        kwargs["pretrained"] = cfg["pretrained"]
    target: Callable[..., nn.Module] = import_object(cfg["builder"]["_target_"])
    module = target(**kwargs)
    if not isinstance(module, nn.Module):
        raise ValueError(f"model.builder._target_={cfg['builder']['_target_']!r} returned "
                         f"{type(module).__name__}, not an nn.Module")
    return ModelBundle(cfg["name"], variant, module.eval(), specs, config_hash(cfg, variant),
                       DenoiserContract.from_config(cfg.get("contract")))
