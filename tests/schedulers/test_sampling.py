"""The sampling loop against diffusers' own use of the same schedulers, bit-exactly, and the
classifier-free guidance arithmetic against a hand computation."""
from __future__ import annotations

import pytest
import torch

from schedulers import SCHEDULERS, Denoiser, make_scheduler, sample


def toy_eps(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """An analytic ε that depends on the latent, the timestep and the conditioning."""
    s = t.float() / 1000
    return torch.sin(x) * (0.5 + s) + 0.3 * torch.cos(3 * s) + emb * s


class Toy:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], float, int, dict]] = []

    def __call__(self, x, t, step, cond):
        self.calls.append((tuple(x.shape), float(t), step, dict(cond)))
        return toy_eps(x, t, cond["emb"])


def start(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 4, 8, 8, generator=g)
    return x_T, {"emb": torch.randn(batch, 4, 1, 1, generator=g)}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_loop_matches_diffusers_step_by_step(name):
    # The recipe of diffusers' StableDiffusionPipeline.__call__, written out by hand.
    x_T, cond = start()
    steps = 12
    ref = make_scheduler(name)
    ref.set_timesteps(steps, device=x_T.device)
    latents = x_T * ref.init_noise_sigma
    for t in ref.timesteps:
        model_in = ref.scale_model_input(latents, t)
        latents = ref.step(toy_eps(model_in, t, cond["emb"]), t, latents, return_dict=False)[0]

    toy = Toy()
    out = sample(toy, make_scheduler(name), x_T, cond, steps=steps)
    assert isinstance(toy, Denoiser)
    assert torch.equal(out, latents)
    assert [c[2] for c in toy.calls] == list(range(steps))
    assert [c[1] for c in toy.calls] == [float(t) for t in ref.timesteps]
    # The toy is sensitive: freezing its timestep changes the result.
    frozen = sample(lambda x, t, k, c: toy_eps(x, t * 0 + 500, c["emb"]), make_scheduler(name),
                    x_T, cond, steps=steps)
    assert (frozen - out).abs().max() > 1e-3


def test_loop_matches_ddim_pipeline():
    # diffusers' own DDIMPipeline on a tiny random UNet2DModel (every weight re-drawn: diffusers
    # zero-initialises some output layers, which would make ε ≡ 0 and the test vacuous).
    from diffusers import DDIMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    pipe = DDIMPipeline(unet=unet, scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    steps = 6
    expected = pipe(batch_size=1, generator=torch.Generator().manual_seed(3), eta=0.0,
                    num_inference_steps=steps, output_type="pt").images

    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = sample(lambda x, t, k, c: unet(x, t).sample, make_scheduler("ddim"), x_T, {},
                 steps=steps)
    assert torch.equal((out / 2 + 0.5).clamp(0, 1), expected)
    assert 0.01 < expected.std() and not torch.equal(out, x_T)


def test_guidance_by_hand():
    x_T, cond = start(seed=1)
    _, uncond = start(seed=2)
    g, steps = 7.5, 5
    toy, seen = Toy(), []
    out = sample(toy, make_scheduler("ddim"), x_T, cond, steps=steps, guidance_scale=g,
                 uncond=uncond, callback=seen.append)

    # One call per step, on the batch [uncond, cond] with the latent duplicated.
    assert [c[2] for c in toy.calls] == list(range(steps))
    for shape, _, _, c in toy.calls:
        assert shape == (4, 4, 8, 8)
        assert torch.equal(c["emb"], torch.cat([uncond["emb"], cond["emb"]]))
    # ε by hand: ε(x, t, e) = sin(x)(½ + s) + 0.3 cos 3s + e·s, so the guided ε is
    # sin(x)(½ + s) + 0.3 cos 3s + (u + g(c − u))·s. Rounding differs from the loop's
    # ε_u + g(ε_c − ε_u), hence the float32 tolerance.
    x = x_T
    for info in seen:
        s = info["t"].float() / 1000
        hand = torch.sin(x) * (0.5 + s) + 0.3 * torch.cos(3 * s) \
            + (uncond["emb"] + g * (cond["emb"] - uncond["emb"])) * s
        torch.testing.assert_close(info["eps"], hand, rtol=0, atol=2e-5)
        # And the loop's own formula on separate calls is bit-exact.
        e_u, e_c = toy_eps(x, info["t"], uncond["emb"]), toy_eps(x, info["t"], cond["emb"])
        assert torch.equal(info["eps"], e_u + g * (e_c - e_u))
        x = info["x"]
    assert torch.equal(x, out)
    plain = sample(Toy(), make_scheduler("ddim"), x_T, cond, steps=steps)
    assert (plain - out).abs().max() > 1e-3


def test_callback_sees_every_step():
    x_T, cond = start()
    seen = []
    out = sample(Toy(), make_scheduler("euler"), x_T, cond, steps=7, callback=seen.append)
    sched = make_scheduler("euler")
    sched.set_timesteps(7)
    assert [i["step"] for i in seen] == list(range(7))
    assert torch.equal(torch.stack([i["t"] for i in seen]), sched.timesteps)
    assert torch.equal(seen[-1]["x"], out)
    assert all(set(i) == {"step", "t", "x", "eps"} for i in seen)


def test_guidance_argument_errors():
    x_T, cond = start()
    with pytest.raises(ValueError, match="guidance_scale and uncond"):
        sample(Toy(), make_scheduler("ddim"), x_T, cond, steps=2, guidance_scale=5.0)
    with pytest.raises(ValueError, match="guidance_scale and uncond"):
        sample(Toy(), make_scheduler("ddim"), x_T, cond, steps=2, uncond=cond)
    with pytest.raises(ValueError, match="uncond: keys"):
        sample(Toy(), make_scheduler("ddim"), x_T, cond, steps=2, guidance_scale=5.0,
               uncond={"other": cond["emb"]})
