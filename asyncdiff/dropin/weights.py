"""Park the denoiser weights a rank's stage does not use, and put them back.

Under the distributed drop-in each rank runs one stage, so the rest of the denoiser's
parameters and buffers are replaced, in place in the module, by *placeholders*: one-element
tensors expanded to the original shape, dtype and device (NaN for floats, so any use shows),
which keep ``module.dtype``, ``module.device`` and shape-reading code working while holding
no memory. The originals are either kept in host memory (``offload="cpu"``: the accelerator
memory is freed, :meth:`Parked.restore` moves them back, the very same tensor objects) or
dropped (``offload="drop"``: nothing is kept anywhere; restoring is refused).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

OFFLOAD: tuple[str, ...] = ("cpu", "drop")


def placeholder(t: torch.Tensor) -> torch.Tensor:
    fill = float("nan") if t.is_floating_point() or t.is_complex() else 0
    out = torch.full((), fill, dtype=t.dtype, device=t.device).expand(t.shape)
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
        else out


def is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


class Parked:
    """The tensors of ``module`` swapped out by :meth:`release`; :meth:`restore` undoes it."""

    def __init__(self, module: nn.Module, offload: str):
        if offload not in OFFLOAD:
            raise ValueError(f"offload={offload!r}; allowed: {', '.join(OFFLOAD)}")
        self.module, self.offload = module, offload
        # (owner module, "_parameters" | "_buffers", name, original or None, its device)
        self.entries: list[tuple[nn.Module, str, str, torch.Tensor | None, torch.device]] = []
        self.dropped = False

    def release(self, keep: Iterable[torch.Tensor]) -> int:
        """Swap out every parameter and buffer not in ``keep``; return the elements freed."""
        keep_ids = {id(t) for t in keep}
        freed = 0
        for owner in self.module.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(owner, kind)
                for name, t in list(table.items()):
                    if t is None or id(t) in keep_ids or is_placeholder(t):
                        continue
                    table[name] = placeholder(t)
                    freed += t.numel()
                    if self.offload == "drop":
                        self.entries.append((owner, kind, name, None, t.device))
                        self.dropped = True
                    else:
                        self.entries.append((owner, kind, name, t, t.device))
                        t.data = t.data.to("cpu")
        return freed

    def restore(self) -> None:
        """Put every original back, on its device (refused when they were dropped)."""
        if self.dropped:
            raise RuntimeError("the denoiser weights this rank's stage does not use were dropped "
                               "(offload='drop'); they cannot be restored: reload the pipeline, "
                               "or parallelize with offload='cpu'")
        for owner, kind, name, t, device in reversed(self.entries):
            t.data = t.data.to(device)
            getattr(owner, kind)[name] = t
        self.entries.clear()


def held_elements(module: nn.Module) -> int:
    """Elements of the parameters and buffers ``module`` really holds (placeholders excluded)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen and not is_placeholder(t):
            seen.add(id(t))
            total += t.numel()
    return total
