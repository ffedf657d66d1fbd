"""The only module that talks to ``torch.distributed``.

Everything degrades to single-process behaviour when no process group is initialised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

from sparseml.errors import NumericalError

T = TypeVar("T")


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def is_primary() -> bool:
    return rank() == 0


def _comm_device(t: Tensor) -> Tensor:
    # nccl needs CUDA tensors; gloo works on CPU tensors.
    if tdist.get_backend() == "nccl" and t.device.type != "cuda":
        return t.cuda()
    return t


def all_reduce_mean_(tensors: list[Tensor], dtype: torch.dtype = torch.float32) -> None:
    """Average ``tensors`` in place over all ranks (one flat ``dtype`` buffer, one collective;
    float64 for estimates that must equal a single process's up to the last bit)."""
    if not is_distributed() or not tensors:
        return
    flat = _comm_device(torch.cat([t.reshape(-1).to(dtype) for t in tensors]))
    tdist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.device, t.dtype))
        offset += n


def all_reduce_sum_(t: Tensor) -> Tensor:
    if is_distributed():
        buf = _comm_device(t)
        tdist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s value."""
    if is_distributed():
        buf = _comm_device(t)
        tdist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)
    return t


def shard_bounds(n: int, parts: int | None = None, index: int | None = None) -> tuple[int, int]:
    """Contiguous ``[lo, hi)`` share of ``n`` items owned by rank ``index`` of ``parts``."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def all_gather_shards(local: Tensor, n: int) -> Tensor:
    """Concatenate each rank's ``shard_bounds(n)`` slice (dim 0) into the full tensor."""
    if not is_distributed():
        return local
    parts = world_size()
    sizes = [shard_bounds(n, parts, r) for r in range(parts)]
    rows = max(hi - lo for lo, hi in sizes)
    # Collectives want equal sizes on every rank: pad each shard to the largest, then trim.
    padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    padded = _comm_device(padded)
    bufs = [torch.empty_like(padded) for _ in range(parts)]
    tdist.all_gather(bufs, padded)
    pieces = [b[: hi - lo].to(local.device) for b, (lo, hi) in zip(bufs, sizes)]
    return torch.cat(pieces, dim=0)


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def on_all_ranks(fn: Callable[[], T], owner: str) -> T:
    """``fn()``, failing on every rank if it fails on one (not a hang at the next collective)."""
    error = None
    try:
        result = fn()
    except Exception as err:  # re-raised below, after the other ranks learnt about it
        error = err
    failed = all_reduce_sum_(torch.tensor([float(error is not None)]))
    if error is not None:
        raise error
    if failed.item() > 0:
        raise NumericalError(f"{owner} failed on another rank; nothing was written")
    return result
