"""Hand-written PyTorch denoisers (no diffusers) for the breadth table: the shapes a
researcher's own network takes that the diffusers classes do not cover."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partition.spec import InputSpec

C = 16


def _temb(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = torch.arange(dim // 2, dtype=torch.float32) / (dim // 2)
    ang = t.reshape(-1, 1).float() * torch.exp(-4.0 * half)[None]
    return torch.cat([ang.sin(), ang.cos()], -1)


class LongSkipUNet(nn.Module):
    """A plain conv U-Net: every encoder level's output is concatenated into the mirrored
    decoder level (long skips across the whole network)."""

    def __init__(self, levels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(4, C, 3, padding=1)
        self.time = nn.Linear(C, C)
        self.down = nn.ModuleList(nn.Conv2d(C, C, 3, stride=2, padding=1) for _ in range(levels))
        self.mid = nn.Conv2d(C, C, 3, padding=1)
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * C, C, 4, stride=2, padding=1)
                                for _ in range(levels))
        self.conv_out = nn.Conv2d(C, 4, 3, padding=1)

    def forward(self, x, t):
        emb = self.time(_temb(t, C))[:, :, None, None]
        h = self.conv_in(x)
        skips = []
        for d in self.down:
            skips.append(h)
            h = F.silu(d(h) + emb)
        h = F.silu(self.mid(h))
        for u in self.up:
            h = F.silu(u(torch.cat([h, F.interpolate(skips.pop(), size=h.shape[-2:])], 1)))
        return self.conv_out(h)


class FiLMNet(nn.Module):
    """Residual MLP blocks modulated (FiLM: per-channel scale and shift) by a class label and
    the timestep."""

    def __init__(self, depth: int = 6, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(8, 4 * C)
        self.label = nn.Embedding(classes, 4 * C)
        self.film = nn.ModuleList(nn.Linear(4 * C, 8 * C) for _ in range(depth))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(4 * C), nn.Linear(4 * C, 4 * C))
                                    for _ in range(depth))
        self.out = nn.Linear(4 * C, 8)

    def forward(self, x, t, label):
        cond = _temb(t, 4 * C) + self.label(label)
        h = self.inp(x)
        for film, block in zip(self.film, self.blocks):
            scale, shift = film(cond).chunk(2, -1)
            h = h + torch.tanh(block(h) * (1 + scale[:, None]) + shift[:, None])
        return self.out(h)


class SharedBlockNet(nn.Module):
    """One transformer-style block applied twice at different places (weights shared), as
    recurrent-depth or weight-tied denoisers do."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 2 * C)
        self.time = nn.Linear(2 * C, 2 * C)
        self.pre = nn.Sequential(nn.LayerNorm(2 * C), nn.Linear(2 * C, 2 * C))
        self.shared = nn.Sequential(nn.LayerNorm(2 * C), nn.Linear(2 * C, 4 * C), nn.GELU(),
                                    nn.Linear(4 * C, 2 * C))
        self.post = nn.Sequential(nn.LayerNorm(2 * C), nn.Linear(2 * C, 2 * C))
        self.out = nn.Linear(2 * C, 8)

    def forward(self, x, t):
        h = self.inp(x) + self.time(_temb(t, 2 * C))[:, None]
        h = h + self.shared(h)
        h = h + torch.tanh(self.pre(h))
        h = h + self.shared(h)
        h = h + torch.tanh(self.post(h))
        return self.out(h)


def handwritten() -> dict[str, tuple[nn.Module, tuple[InputSpec, ...], str]]:
    """name -> (model, input specs, description)."""
    torch.manual_seed(0)
    t = InputSpec("t", (2,), role="timestep", init="timestep")
    return {
        "handwritten/long_skip_unet": (
            LongSkipUNet().eval(), (InputSpec("x", (2, 4, 16, 16), role="latent"), t),
            "conv U-Net with long skips, no diffusers"),
        "handwritten/film": (
            FiLMNet().eval(), (InputSpec("x", (2, 6, 8), role="latent"), t,
                               InputSpec("label", (2,), dtype="int64", init="randint:10")),
            "residual MLP with FiLM from label and timestep"),
        "handwritten/shared_block": (
            SharedBlockNet().eval(), (InputSpec("x", (2, 6, 8), role="latent"), t),
            "one block applied twice (shared weights)"),
    }
