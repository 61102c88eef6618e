"""Hand-written denoisers for the compiler's tests: each exercises one way a real network can
trip a compiler (in-place writes, data-dependent shapes, uncapturable Python, heavy
conditioning, unusual call signatures). Every one is *sensitive*: its output depends on every
input, on the timestep and on every block (docs/design.md §2, invariants)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from partition.spec import InputSpec

D = 16  # hidden width
L = 6   # tokens


def seq_specs(batch: int = 2, cond: bool = True, **extra) -> tuple[InputSpec, ...]:
    specs = [InputSpec("sample", (batch, L, 8), role="latent"),
             InputSpec("timestep", (), role="timestep", init="timestep")]
    if cond:
        specs.append(InputSpec("context", (batch, 4, D)))
    return tuple(specs)


def example(specs, seed: int = 0) -> dict[str, torch.Tensor]:
    from experiments.zoo import example_inputs
    return example_inputs(list(specs), seed)


class Block(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.mod = nn.Linear(d, d)

    def forward(self, h, temb, ctx=None):
        out = torch.tanh(self.fc(self.norm(h) * (1 + self.mod(temb))))
        if ctx is not None:
            out = out + ctx.mean(1, keepdim=True)
        return h + out


class TimeEmbed(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.lin = nn.Linear(1, d)

    def forward(self, t):
        return torch.sin(self.lin(t.reshape(1, 1) / 100.0))[:, None, :]


class SeqDenoiser(nn.Module):
    """Base: in-projection, ``depth`` blocks, out-projection; subclasses add one twist."""

    def __init__(self, depth: int = 6):
        super().__init__()
        self.inp = nn.Linear(8, D)
        self.time = TimeEmbed()
        self.ctx = nn.Linear(D, D)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.out = nn.Linear(D, 8)

    def forward(self, sample, timestep, context):
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        for b in self.blocks:
            h = b(h, temb, ctx)
        return self.out(h)


# --------------------------------------------------------------------------- side effects


class RotaryGrid(SeqDenoiser):
    """A rotary-style table written by slice assignment into a tensor made in ``forward``:
    export records ``copy_`` nodes that nothing reads."""

    def forward(self, sample, timestep, context):
        grid = torch.zeros(L, D)
        pos = torch.arange(L, dtype=torch.float32)[:, None]
        grid[:, 0:D // 2] = torch.sin(pos / 3)
        grid[:, D // 2:] = torch.cos(pos * timestep / 500)
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        for b in self.blocks:
            h = b(h * grid, temb, ctx)
        return self.out(h)


class FillAndIndexPut(SeqDenoiser):
    """``fill_`` on a made tensor, ``index_put_`` into it, ``masked_fill_`` on a trunk value."""

    def forward(self, sample, timestep, context):
        scale = torch.empty(1, 1, D)
        scale.fill_(0.5)
        scale[0, 0, torch.tensor([1, 3])] = timestep / 1000
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        for i, b in enumerate(self.blocks):
            h = b(h, temb, ctx) * (1 + scale)
            if i == 2:
                h.masked_fill_(h > 1.5, 1.5)
        return self.out(h)


class InPlaceAlias(SeqDenoiser):
    """In-place arithmetic on a trunk value through a view, read again afterwards: the read
    must see the write, and a value read before the write must not."""

    def forward(self, sample, timestep, context):
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        for i, b in enumerate(self.blocks):
            before = h * 1.0
            h = b(h, temb, ctx)
            view = h.view(h.shape[0], -1)
            view.mul_(0.9).add_(before.view(h.shape[0], -1), alpha=0.1)
        return self.out(h)


# --------------------------------------------------------------------------- data-dependent


class NonzeroAttention(SeqDenoiser):
    """Attention restricted to the tokens a mask selects (``nonzero``: a data-dependent
    shape; fake tensors cannot say how many)."""

    def forward(self, sample, timestep, context, mask):
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        keep = mask.nonzero()[:, 0]
        for b in self.blocks:
            sel = h.index_select(1, keep)
            att = torch.softmax(h @ sel.transpose(1, 2) / 4, -1) @ sel
            h = b(h + 0.1 * att, temb, ctx)
        return self.out(h)


NONZERO_SPECS = seq_specs() + (InputSpec("mask", (L,), init="randint:2"),)


# --------------------------------------------------------------------------- weight sharing


class _Wrapped(nn.Module):
    """A block that calls a module it shares with its parent (a down block's resnet)."""

    def __init__(self, shared: nn.Module):
        super().__init__()
        self.shared = shared

    def forward(self, h, temb, ctx):
        return self.shared(h, temb, ctx) * 0.5 + h


class _SharedBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.res_b = Block()
        self.wrap = _Wrapped(self.res_b)
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, h, temb, ctx):
        h = self.wrap(self.blocks[0](h, temb, ctx), temb, ctx)   # res_b, call 0
        h = self.res_b(self.blocks[1](h, temb, ctx), temb, ctx)  # res_b, call 1
        return self.blocks[3](self.blocks[2](h, temb, ctx), temb, ctx)


class SharedBlock(nn.Module):
    """One block instance called at two positions: first inside another block, then on its
    own. A block answered by its owner's value does not run, so the calls inside it are not
    made: the module backend must still count them to tell the shared block's calls apart."""

    def __init__(self):
        super().__init__()
        self.inp, self.time, self.ctx = nn.Linear(8, D), TimeEmbed(), nn.Linear(D, D)
        self.model = _SharedBody()
        self.out = nn.Linear(D, 8)

    def forward(self, sample, timestep, context):
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        return self.out(self.model(h, temb, ctx))


# --------------------------------------------------------------------------- uncapturable


class SetOfLengths(SeqDenoiser):
    """``len(set(seq_lengths))``: Python over tensor values (a packed-batch check)."""

    def forward(self, sample, timestep, context, lengths):
        if len(set(lengths.tolist())) > 1:
            sample = sample * (torch.arange(L)[None, :, None] < lengths[:, None, None])
        return super().forward(sample, timestep, context)


class NumpyRouting(SeqDenoiser):
    """Mixture-of-experts routing that leaves torch for numpy."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, 2)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

    def forward(self, sample, timestep, context):
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        for i, b in enumerate(self.blocks):
            h = b(h, temb, ctx)
            if i == 2:
                choice = self.router(h.mean(1)).argmax(-1).numpy()
                h = torch.stack([self.experts[int(c)](h[j]) for j, c in enumerate(choice)])
        return self.out(h)


class DataDependentBranch(SeqDenoiser):
    """``if seq_len > k:`` where the length comes from the data."""

    def forward(self, sample, timestep, context, mask):
        seq_len = int(mask.sum())
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        for i, b in enumerate(self.blocks):
            h = b(h, temb, ctx)
            if seq_len > 3 and i % 2:
                h = h * 0.9 + 0.1 * torch.tanh(h)
        return self.out(h)


# --------------------------------------------------------------------------- conditioning


class HintUNet(nn.Module):
    """A small conv denoiser with a heavy image-hint encoder (a ControlNet-style conditioning
    branch at full resolution) whose features are added after the input conv, and a time
    embedding every block reads."""

    def __init__(self, c: int = 8, hint_layers: int = 6):
        super().__init__()
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.hint = nn.Sequential(*[m for i in range(hint_layers) for m in
                                    (nn.Conv2d(3 if i == 0 else 32, 32, 3, padding=1), nn.SiLU())],
                                  nn.Conv2d(32, c, 1))
        self.time = nn.Sequential(nn.Linear(1, 4 * c), nn.SiLU(), nn.Linear(4 * c, c))
        self.blocks = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(8))
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, sample, timestep, hint):
        temb = self.time(timestep.reshape(1, 1) / 1000)[:, :, None, None]
        h = self.conv_in(sample) + self.hint(hint)
        for b in self.blocks:
            h = h + F.silu(b(h) + temb)
        return self.conv_out(h)


HINT_SPECS = (InputSpec("sample", (2, 4, 16, 16), role="latent"),
              InputSpec("timestep", (), role="timestep", init="timestep"),
              InputSpec("hint", (2, 3, 16, 16)))


class CaptionDiT(SeqDenoiser):
    """A DiT-like denoiser whose caption projection (a wide text encoder output projected to
    the hidden size, read by every block) is heavier than its blocks."""

    def __init__(self, text: int = 512):
        super().__init__()
        self.caption = nn.Sequential(nn.Linear(text, 4 * text), nn.GELU(), nn.Linear(4 * text, D))

    def forward(self, sample, timestep, context):
        h, temb, ctx = self.inp(sample), self.time(timestep), self.caption(context)
        for b in self.blocks:
            h = b(h, temb, ctx)
        return self.out(h)


CAPTION_SPECS = seq_specs(cond=False) + (InputSpec("context", (2, 4, 512)),)


# --------------------------------------------------------------------------- call contracts


class RotaryTuple(SeqDenoiser):
    """Takes a rotary ``(cos, sin)`` tuple, fixed ``num_frames``/``fps`` arguments, a
    timestep it wants in [0, 1] per frame, returns ``(prediction, aux)`` with a learned-σ
    half, and reads a second per-step input (a ControlNet-style residual)."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(D, 16)

    def forward(self, hidden_states, timestep, context, image_rotary_emb, residual, *,
                num_frames: int, fps: float, return_dict: bool = True):
        assert isinstance(image_rotary_emb, tuple) and len(image_rotary_emb) == 2
        assert num_frames == 3 and fps == 7.5 and not return_dict
        assert timestep.shape == (num_frames,)
        cos, sin = image_rotary_emb
        h = self.inp(hidden_states) * cos + sin
        temb, ctx = self.time(timestep.mean() * 1000), self.ctx(context)
        for i, b in enumerate(self.blocks):
            h = b(h, temb, ctx)
            if i == 1:
                h = h + residual
        out = self.out(h)
        return out, out.mean()


ROTARY_SPECS = (InputSpec("hidden_states", (2, L, 8), role="latent"),
                InputSpec("timestep", (3,), role="timestep", init="timestep"),
                InputSpec("context", (2, 4, D)),
                InputSpec("image_rotary_emb.0", (L, D)),
                InputSpec("image_rotary_emb.1", (L, D)),
                InputSpec("residual", (2, L, D), role="per_step"))


class TokenLogits(SeqDenoiser):
    """Predicts token logits (another shape and dtype than the latent: half precision)."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.out = nn.Linear(D, vocab)

    def forward(self, sample, timestep, context):
        return super().forward(sample, timestep, context).to(torch.float16)


# --------------------------------------------------------------------------- kernel paths


class FastPathAttention(SeqDenoiser):
    """``nn.MultiheadAttention`` between blocks: under ``no_grad`` eager takes its fused
    fast path, which torch.export does not capture (the captured graph equals eager with
    autograd on)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(D, 2, batch_first=True)
                                  for _ in range(3))

    def forward(self, sample, timestep, context):
        h, temb, ctx = self.inp(sample), self.time(timestep), self.ctx(context)
        for i, b in enumerate(self.blocks):
            h = b(h, temb, ctx)
            if i % 2 == 0:
                h = h + self.attn[i // 2](h, h, h, need_weights=False)[0]
        return self.out(h)


# --------------------------------------------------------------------------- lazy caches


class _Rope:
    """A plain helper object (not a module) that fills its table on first use."""

    def __init__(self):
        self.table = None

    def __call__(self, n: int) -> torch.Tensor:
        if self.table is None:
            self.table = torch.sin(torch.arange(n, dtype=torch.float32)[:, None] / 3
                                   + torch.arange(D, dtype=torch.float32)[None])
        return self.table


class LazyTables(SeqDenoiser):
    """Tables filled lazily on the first call: on a helper object and in an
    ``functools.lru_cache`` of a method. Traced first, they would hold traced values."""

    def __init__(self):
        super().__init__()
        self.rope = _Rope()

    @functools.lru_cache(maxsize=8)
    def _bias(self, n: int) -> torch.Tensor:
        return torch.cos(torch.arange(n * D, dtype=torch.float32).reshape(n, D) / 7)

    def forward(self, sample, timestep, context):
        h = self.inp(sample) * self.rope(sample.shape[1]) + self._bias(sample.shape[1])
        temb, ctx = self.time(timestep), self.ctx(context)
        for b in self.blocks:
            h = b(h, temb, ctx)
        return self.out(h)
