"""Point-to-point messages between pipeline devices: packing, tags, failure naming.

Only the values a device consumes travel to it, packed into one buffer per (source,
destination, dtype) per round; ε travels to every device. No collectives in the steady
state, so R independent pipelines share one world without process groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TAG_VALUES = 1       # packed cross-stage values of a parallel round
TAG_EPS = 16         # + copy index: ε of one step
TAG_WARMUP = 1024    # + value index: one value sent fresh inside a warm-up round
TAG_HOISTED = 1 << 20  # + hoisted value index: a value computed once per run, from its home


class PeerError(RuntimeError):
    """A message to or from another worker failed: that worker probably died."""


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else \
        tensors[0].reshape(-1).clone()


def sendable(t: torch.Tensor) -> torch.Tensor:
    """Process groups send only contiguous memory (a narrowed ε, e.g. a learned-σ model's)."""
    return t if t.is_contiguous() else t.contiguous()


def unpack(buf: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        size = 1
        for s in shape:
            size *= s
        out.append(buf[offset:offset + size].view(shape))
        offset += size
    return out


@dataclass
class Pending:
    """Outstanding non-blocking operations of one round, waited together."""

    me: int
    # (work, kind, peer, buffer): the buffer is kept alive until the operation completes
    ops: list[tuple[object, str, int, torch.Tensor]] = field(default_factory=list)
    bytes_sent: int = 0

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = sendable(tensor)
        try:
            self.ops.append((dist.isend(tensor, dst=dst, tag=tag), "send to", dst, tensor))
        except RuntimeError as err:
            raise PeerError(f"rank {self.me}: send to rank {dst} failed: {err}") from err
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        try:
            self.ops.append((dist.irecv(tensor, src=src, tag=tag), "receive from", src, tensor))
        except RuntimeError as err:
            raise PeerError(f"rank {self.me}: receive from rank {src} failed: {err}") from err

    def wait(self) -> None:
        for work, kind, peer, _buffer in self.ops:
            try:
                work.wait()
            except RuntimeError as err:
                raise PeerError(f"rank {self.me}: {kind} rank {peer} failed "
                                f"(did rank {peer} die?): {str(err).splitlines()[0]}") from err
        self.ops.clear()


def recv_now(shape, dtype, src: int, tag: int, me: int, device) -> torch.Tensor:
    """Blocking receive (warm-up rounds, where the value is needed before computing)."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    try:
        dist.recv(buf, src=src, tag=tag)
    except RuntimeError as err:
        raise PeerError(f"rank {me}: receive from rank {src} failed (did rank {src} die?): "
                        f"{str(err).splitlines()[0]}") from err
    return buf
