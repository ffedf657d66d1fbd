"""Block-diagonal Fisher inverses of a modifier's parameters, sharded across ranks.

Shared by the OBS and CAP modifiers. The blocks of all selected parameters (B consecutive
flattened weights each, the last block of a parameter zero-padded) are numbered in order and
split into contiguous ranges, one per rank; each rank builds, inverts and uses only its own
blocks, then ``BlockLayout.gather`` reassembles per-parameter vectors on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.errors import NumericalError
from sparseml.kernels.fisher import (
    accumulate_block_gram,
    invert_block_fisher,
    mspace_block_inverse,
    num_blocks,
)

T = TypeVar("T")


def on_all_ranks(fn: Callable[[], T], owner: str) -> T:
    """``fn()``, failing on every rank if it fails on one (not a hang at the next collective)."""
    error = None
    try:
        result = fn()
    except Exception as err:  # re-raised below, after the other ranks learnt about it
        error = err
    failed = dist.all_reduce_sum_(torch.tensor([float(error is not None)]))
    if error is not None:
        raise error
    if failed.item() > 0:
        raise NumericalError(f"{owner} failed on another rank; nothing was written")
    return result


@dataclass(frozen=True)
class BlockPart:
    """This rank's share of parameter ``index``: blocks [b0, b1) = flat coordinates [c0, c1)."""

    index: int
    b0: int
    b1: int
    c0: int
    c1: int


class BlockLayout:
    """This rank's contiguous share of the Fisher blocks of parameters of ``sizes`` elements."""

    def __init__(self, sizes: list[int], block_size: int) -> None:
        self.sizes, self.block_size = sizes, block_size
        counts = [num_blocks(n, block_size) for n in sizes]
        self.total = sum(counts)
        lo, hi = dist.shard_bounds(self.total)
        self.parts: list[BlockPart] = []
        offset = 0
        for i, (n, count) in enumerate(zip(sizes, counts)):
            b0, b1 = max(lo - offset, 0), min(hi - offset, count)
            if b0 < b1:
                self.parts.append(BlockPart(i, b0, b1, b0 * block_size, min(b1 * block_size, n)))
            offset += count

    def gather(
        self, local: list[Tensor], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> list[Tensor]:
        """Per-parameter full (numel,) ``dtype`` vectors from each rank's (c1 - c0,) pieces."""
        bsz = self.block_size
        rows = torch.zeros(sum(p.b1 - p.b0 for p in self.parts), bsz, device=device, dtype=dtype)
        start = 0
        for p, x in zip(self.parts, local):
            rows[start : start + p.b1 - p.b0].view(-1)[: p.c1 - p.c0] = x.to(device, dtype)
            start += p.b1 - p.b0
        full = dist.all_gather_shards(rows, self.total).reshape(-1)
        out, offset = [], 0
        for n in self.sizes:
            out.append(full[offset : offset + n])
            offset += num_blocks(n, bsz) * bsz
        return out


def build_block_inverses(modifier, module: nn.Module, layout: BlockLayout) -> list[Tensor]:
    """H (b1 - b0, B, B) for each of this rank's parts of ``modifier``'s parameters.

    Gradient chunks are accumulated as per-block Grams with batched float64 GEMMs and inverted
    in place with a float64 Cholesky, so H is float64 and accurate to ~1e-6 relative for damp
    down to ~1e-10 ||G^T G / m|| (a float32 Gram loses every direction of F below
    eps_32 ||G^T G / m||). With fewer samples than the block size (m < B) the inverse is built
    in the m-dimensional sample space instead (float64 math, H in the modifier's work dtype).
    """
    bsz, m = layout.block_size, modifier.num_grads
    mspace = m < bsz
    store = []
    for p in layout.parts:
        device = modifier.fisher_device(modifier.refs[p.index].param)
        if mspace:
            store.append(torch.zeros(m, p.c1 - p.c0, device=device, dtype=modifier.work_dtype))
        else:
            store.append(torch.zeros(p.b1 - p.b0, bsz, bsz, device=device, dtype=torch.float64))
    row = 0
    for chunk in modifier.gradient_chunks(module):
        for p, buf in zip(layout.parts, store):
            grads = chunk[p.index][:, p.c0 : p.c1]
            if mspace:
                buf[row : row + grads.shape[0]] = grads.to(buf.device)
            else:
                accumulate_block_gram(grads, bsz, out=buf)
        row += chunk[0].shape[0]
    owner = type(modifier).__name__
    if mspace:
        return on_all_ranks(
            lambda: [
                mspace_block_inverse(g, bsz, modifier.damp, dtype=modifier.work_dtype)
                for g in store
            ],
            owner,
        )
    return on_all_ranks(lambda: [invert_block_fisher(g, m, modifier.damp) for g in store], owner)
