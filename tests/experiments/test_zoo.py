"""The model zoo: every ``conf/model/*.yaml`` builds a tiny, *sensitive* denoiser that obeys
the denoiser contract ([Note: denoiser contract] in ``experiments/zoo.py``) and exports
bit-exactly; full configs are the released architectures; bad YAML fails loudly."""
from __future__ import annotations

import copy
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from torch import nn

from experiments import zoo
from partition.spec import InputSpec, call_denoiser
from tiers import SLOW_MODELS, model_params

MODELS = zoo.model_names()

# Parameter counts of the full configs, counted on the meta device. Cross-checked against
# the released checkpoints: sd15 859.5M, sd21 865.9M, sdxl 2567.5M (the official splits),
# sd3 medium 2.03B, flux-dev 11.9B, svd-xt 1.52B, pixart-alpha 0.61B, animatediff =
# SD-1.5 UNet + 453M motion modules. diffusers' DiT-XL/2 has 749.8M, not the paper's 675M:
# every block carries its own timestep/label embedding (the checkpoint loads one copy into each).
FULL_PARAMS = {
    "animatediff": 1_312_730_244,
    "digits": 3_276_257,  # the trained reference models (full == tiny)
    "patches": 8_478_467,
    "dit": 749_826_464,
    "flux": 11_901_408_320,
    "pixart": 611_349_152,
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sd3": 2_028_328_000,
    "sdxl": 2_567_463_684,
    "svd": 1_524_623_082,
}


# one thread per test: the autouse fixture in tests/partition/conftest.py


@functools.cache
def tiny(name: str) -> zoo.ModelBundle:
    return zoo.build(zoo.load_yaml(name), "tiny", seed=0)


def run(bundle: zoo.ModelBundle, inputs: dict) -> torch.Tensor:
    """ε of the bundle's eager model, through its contract."""
    with torch.no_grad():
        return bundle(inputs)


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_zoo_holds_every_architecture():
    assert set(MODELS) >= {"sd15", "sd21", "sdxl", "sd3", "pixart", "dit", "flux", "svd",
                           "animatediff"}
    assert set(FULL_PARAMS) == set(MODELS), "add the new model's full parameter count"


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", model_params(MODELS))
def test_tiny_forward_is_eps_of_latent_shape(name):
    b = tiny(name)
    x = b.inputs(0)
    out = run(b, x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == x[b.latent].shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0
    # O(1) activations: the re-drawn weights neither blow up nor vanish.
    assert 1e-2 < float(out.std()) < 1e2


@pytest.mark.parametrize("name", model_params(MODELS))
def test_tiny_output_depends_on_timestep(name):
    b = tiny(name)
    x = b.inputs(0)
    t = next(s.name for s in b.specs if s.role == "timestep")
    x2 = dict(x, **{t: (x[t] + 100.0) % 1000.0})
    assert rel_change(run(b, x2), run(b, x)) > 1e-3


@pytest.mark.parametrize("name", model_params(MODELS))
def test_tiny_output_depends_on_latent(name):
    b = tiny(name)
    x = b.inputs(0)
    x2 = dict(x, **{b.latent: b.inputs(1)[b.latent]})
    assert rel_change(run(b, x2), run(b, x)) > 1e-3


class Positional(nn.Module):
    """Positional tensors in, one tensor out: what ``torch.export`` wants."""

    def __init__(self, bundle: zoo.ModelBundle, names: list[str]):
        super().__init__()
        self.module = bundle.module
        self.contract, self.specs = bundle.contract, bundle.specs
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return call_denoiser(self.module, dict(zip(self.names, args)), self.contract, self.specs)


# Exporting a UNet takes 3-20 s on a loaded core (the video ones the most): the full tier
# (partition/test_capture.py exports the SD 1.5 UNet in the fast one)
EXPORT_CASES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS | {"sd15"} else n
                for n in MODELS]


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_tiny_exports_bit_exactly(name):
    b = tiny(name)
    x = b.inputs(0)
    wrapper = Positional(b, list(x))
    args = tuple(x.values())
    with torch.no_grad():
        gm = torch.export.export(wrapper, args, strict=False).module()
        assert torch.equal(gm(*args), wrapper(*args))


@pytest.mark.parametrize("name", model_params(MODELS))
def test_reinit_redraws_every_parameter_and_buffer(name):
    cfg = zoo.load_yaml(name)
    module = zoo.import_object(cfg["builder"]["cls"]).from_config(cfg["tiny"]["config"])
    before = {k: v.clone() for k, v in [*module.named_parameters(), *module.named_buffers()]
              if v.is_floating_point()}
    zoo.reinit_(module, seed=0)
    after = dict([*module.named_parameters(), *module.named_buffers()])
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert not unchanged
    assert not [k for k in before if not after[k].any()], "an all-zero tensor survived"


def test_same_seed_same_model_other_seed_other_model():
    cfg = zoo.load_yaml("sd15")
    a, b, c = (zoo.build(cfg, "tiny", seed=s).module for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1)


def test_example_inputs_are_deterministic_per_seed():
    b = tiny("dit")
    x0, x0b, x1 = b.inputs(0), b.inputs(0), b.inputs(1)
    assert all(torch.equal(x0[k], x0b[k]) for k in x0)
    assert not torch.equal(x0[b.latent], x1[b.latent])


# --------------------------------------------------------------------------- example inputs


def test_example_input_kinds():
    specs = [
        InputSpec("t", (2,), role="timestep", init="timestep"),
        InputSpec("labels", (64,), init="randint:10"),
        InputSpec("img_ids", (6, 3), init="ids2d:2:3"),
        InputSpec("txt_ids", (4, 3), init="ids_zeros"),
        InputSpec("g", (1,), init="ones"),
        InputSpec("x", (2, 3), role="latent"),
    ]
    x = zoo.example_inputs(specs, seed=0)
    assert list(x) == [s.name for s in specs]
    t = x["t"]
    assert t.dtype == torch.float32 and t[0] == t[1] and 0 <= float(t[0]) < 1000
    assert x["labels"].dtype == torch.int64 and 0 <= int(x["labels"].min())
    assert int(x["labels"].max()) < 10
    assert x["img_ids"].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2],
                                     [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert not x["txt_ids"].any() and x["g"].tolist() == [1.0]
    with pytest.raises(ValueError, match="ids2d:2:3.*\\[6, 3\\]"):
        zoo.example_inputs([InputSpec("ids", (5, 3), init="ids2d:2:3")])
    with pytest.raises(ValueError, match="init='uniform'.*allowed: randn"):
        zoo.example_inputs([InputSpec("x", (2,), init="uniform")])


# --------------------------------------------------------------------------- contract


def raw_forward(module: nn.Module, **kwargs) -> torch.Tensor:
    """The released network's own forward, without the contract."""
    with torch.no_grad():
        return module(**kwargs, return_dict=False)[0]


def test_contract_concat_is_the_pipelines_concat():
    b = tiny("svd")
    x = b.inputs(0)
    raw = dict(x)
    raw["sample"] = torch.cat([raw["sample"], raw.pop("image_latents")], dim=2)
    assert torch.equal(run(b, x), raw_forward(b.module, **raw))


def test_contract_narrow_keeps_eps_and_drops_variance():
    b = tiny("dit")
    x = b.inputs(0)
    full = raw_forward(b.module, **x)
    assert full.shape[1] == 8
    assert torch.equal(run(b, x), full[:, :4])


def test_contract_timestep_scale():
    b = tiny("flux")
    x = b.inputs(0)
    assert torch.equal(run(b, x), raw_forward(b.module, **dict(x, timestep=x["timestep"] * 0.001)))


def test_contract_leaves_the_module_untouched():
    b = tiny("svd")
    plain = zoo.import_object("diffusers.UNetSpatioTemporalConditionModel").from_config(
        zoo.load_yaml("svd")["tiny"]["config"])
    assert list(b.module.state_dict()) == list(plain.state_dict())
    assert type(b.module) is type(plain)  # the released class itself: no mixin, no wrapper
    x = b.inputs(0)
    assert torch.equal(run(b, x), run(zoo.ModelBundle("c", "tiny", copy.deepcopy(b.module),
                                                      b.specs, "", b.contract), x))


# --------------------------------------------------------------------------- full configs


@pytest.mark.parametrize("name", model_params(MODELS))
def test_full_config_is_the_released_architecture(name):
    cfg = zoo.load_yaml(name)
    cls = zoo.import_object(cfg["builder"]["cls"])
    assert zoo.unknown_config_keys(cls, cfg["full"]["config"]) == []
    with torch.device("meta"):
        module = cls.from_config(cfg["full"]["config"])
    assert sum(p.numel() for p in module.parameters()) == FULL_PARAMS[name]
    zoo.validate(cfg, "full")


def test_misspelled_config_key_is_an_error():
    cfg = zoo.load_yaml("sd15")
    cls = zoo.import_object(cfg["builder"]["cls"])
    bad = dict(cfg["tiny"]["config"], cross_atention_dim=32)
    assert zoo.unknown_config_keys(cls, bad) == ["cross_atention_dim"]
    cfg["tiny"]["config"] = bad
    with pytest.raises(ValueError, match="cross_atention_dim"):
        zoo.build(cfg)


# --------------------------------------------------------------------------- errors


def test_unknown_model_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="model='sd16'.*allowed: .*sd15"):
        zoo.load_yaml("sd16")


def test_bad_variant_names_the_key_and_allowed_values():
    with pytest.raises(ValueError, match="variant='huge'.*allowed: tiny, full, pretrained"):
        zoo.build(zoo.load_yaml("dit"), variant="huge")


def _drop(cfg: dict, dotted: str) -> dict:
    *path, last = dotted.split(".")
    d = cfg
    for p in path:
        d = d[p]
    del d[last]
    return cfg


@pytest.mark.parametrize("missing, message", [
    ("name", "model: missing required key 'name'"),
    ("builder", "model: missing required key 'builder'"),
    ("builder._target_", "model.builder: missing required key '_target_'"),
    ("tiny", "model: missing required key 'tiny'"),
    ("tiny.inputs", "model.tiny: missing required key 'inputs'"),
    ("tiny.config", "model.tiny: missing required key 'config'"),
])
def test_missing_field_names_the_key(missing, message):
    with pytest.raises(ValueError, match=message):
        zoo.build(_drop(zoo.load_yaml("dit"), missing))


def test_input_without_shape_names_it():
    cfg = zoo.load_yaml("dit")
    del cfg["tiny"]["inputs"][1]["shape"]
    with pytest.raises(ValueError, match=r"model.tiny.inputs\[1\]: missing required key 'shape'"):
        zoo.build(cfg)


def test_exactly_one_latent():
    cfg = zoo.load_yaml("dit")
    cfg["tiny"]["inputs"][0]["role"] = "cond"
    with pytest.raises(ValueError, match="model.tiny.inputs: exactly one input .* 'latent'"):
        zoo.build(cfg)
    cfg["tiny"]["inputs"][0]["role"] = "latent"
    cfg["tiny"]["inputs"][2]["role"] = "latent"
    with pytest.raises(ValueError, match="exactly one input"):
        zoo.build(cfg)


def test_pretrained_absent_from_cache_is_a_clear_error():
    cfg = zoo.load_yaml("dit")
    cfg["pretrained"] = {"id": "no-such-org/no-such-model", "subfolder": "transformer"}
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model.*local"):
        zoo.build(cfg, variant="pretrained")


def test_config_hash_tracks_architecture_not_seed():
    cfg = zoo.load_yaml("dit")
    h = zoo.config_hash(cfg, "tiny")
    assert h == tiny("dit").config_hash == zoo.build(cfg, "tiny", seed=3).config_hash
    assert len(h) == 64 and h != zoo.config_hash(cfg, "full")
    cfg["tiny"]["config"]["num_layers"] = 3
    assert zoo.config_hash(cfg, "tiny") != h
    cfg = zoo.load_yaml("dit")
    cfg["tiny"]["inputs"][0]["shape"] = [2, 4, 8, 8]
    assert zoo.config_hash(cfg, "tiny") != h


# --------------------------------------------------------------------------- user builders


class TinyDenoiser(nn.Module):
    """A user's own network: not diffusers, positional-free keyword forward."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.temb = nn.Linear(1, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x) + self.temb(t.reshape(-1, 1) / 1000)[:, :, None, None])
        return self.out(h * ctx.mean(-1)[:, :, None, None])


def build_tiny_denoiser(config: dict, seed: int, pretrained: dict | None = None,
                        channels: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.reinit_(TinyDenoiser(config["width"], channels), seed).eval()


def test_user_builder_from_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mine",
        "builder": {"_target_": f"{__name__}.build_tiny_denoiser", "channels": 3},
        "tiny": {"config": {"width": 6}, "inputs": [
            {"name": "x", "shape": [2, 3, 8, 8], "role": "latent"},
            {"name": "t", "shape": [2], "role": "timestep", "init": "timestep"},
            {"name": "ctx", "shape": [2, 6, 5]},
        ]},
    }))
    b = zoo.build(zoo.load_yaml(path))
    assert (b.name, b.variant, b.latent) == ("mine", "tiny", "x")
    assert isinstance(b.module, TinyDenoiser) and b.module.inp.out_channels == 6
    x = b.inputs(0)
    out = run(b, x)
    assert out.shape == (2, 3, 8, 8) and out.abs().max() > 0
    assert rel_change(run(b, dict(x, t=x["t"] + 100)), out) > 1e-3
    gm = torch.export.export(Positional(b, list(x)), tuple(x.values()), strict=False)
    assert torch.equal(gm.module()(*x.values()), out)
