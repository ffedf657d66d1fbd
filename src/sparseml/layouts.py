"""How the selected parameters' flattened weights are cut into parts and shared over ranks.

Every pruner built on `sparseml.pruning.updates` works on *parts*: a part is a range
[c0, c1) of one parameter's row-major flattening that one rank owns. Each rank estimates the
curvature of, scores and updates only its own parts; ``gather`` reassembles full per-parameter
vectors on every rank, so all ranks end with the same masks and weights.

- `BlockLayout`: Fisher blocks of B consecutive coordinates (the last block of a parameter
  zero-padded), numbered over all parameters and split into contiguous ranges per rank.
- `LayerLayout`: one part per whole parameter (per-layer estimates such as K-FAC), the
  parameters dealt out to the ranks.
- `UnprunedLayout`: the unpruned coordinates only, concatenated (M-FAC, full WoodFisher).
- `CompactLayout`: Fisher blocks of B consecutive *unpruned* coordinates of each parameter
  (dynamic blocks: the Fisher holds (1 - s) of the static layout's blocks at sparsity s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparseml import dist


@dataclass(frozen=True)
class BlockPart:
    """This rank's share of parameter ``index``: blocks [b0, b1) = flat coordinates [c0, c1)."""

    index: int
    b0: int
    b1: int
    c0: int
    c1: int


def _num_blocks(d: int, block_size: int) -> int:
    return math.ceil(d / block_size)


class BlockLayout:
    """This rank's contiguous share of the Fisher blocks of parameters of ``sizes`` elements."""

    def __init__(self, sizes: list[int], block_size: int) -> None:
        self.sizes, self.block_size = sizes, block_size
        counts = [_num_blocks(n, block_size) for n in sizes]
        self.total = sum(counts)
        lo, hi = dist.shard_bounds(self.total)
        self.parts: list[BlockPart] = []
        offset = 0
        for i, (n, count) in enumerate(zip(sizes, counts)):
            b0, b1 = max(lo - offset, 0), min(hi - offset, count)
            if b0 < b1:
                self.parts.append(BlockPart(i, b0, b1, b0 * block_size, min(b1 * block_size, n)))
            offset += count

    def take(self, full: list[Tensor]) -> list[Tensor]:
        """This rank's pieces (..., c1 - c0) of per-parameter tensors (..., numel)."""
        return [full[p.index][..., p.c0 : p.c1] for p in self.parts]

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
            offset += _num_blocks(n, bsz) * bsz
        return out


class LayerLayout:
    """One part per whole parameter; parameter i belongs to rank i mod world size."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        world, rank = dist.world_size(), dist.rank()
        self.parts = [BlockPart(i, 0, 1, 0, n) for i, n in enumerate(sizes) if i % world == rank]

    def take(self, full: list[Tensor]) -> list[Tensor]:
        """This rank's whole parameters, in part order."""
        return [full[p.index] for p in self.parts]

    def gather(
        self, local: list[Tensor], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> list[Tensor]:
        """Full per-parameter vectors: each owner's piece, summed with zeros from the others."""
        flat = torch.zeros(sum(self.sizes), device=device, dtype=dtype)
        starts = [0]
        for n in self.sizes[:-1]:
            starts.append(starts[-1] + n)
        for p, x in zip(self.parts, local):
            flat[starts[p.index] : starts[p.index] + self.sizes[p.index]] = x.to(device, dtype)
        dist.all_reduce_sum_(flat)
        return [flat[s : s + n] for s, n in zip(starts, self.sizes)]


class UnprunedLayout:
    """Where each parameter's unpruned weights sit in the flat vector the Fisher acts on.

    Parameter i's unpruned entries (flat indices ``index[i]``) occupy ``[offsets[i],
    offsets[i] + len(index[i]))``. With blocks, each parameter's range is zero-padded to a
    multiple of B (unless blocks cross layers) and the total to a multiple of B; zero gradient
    columns are decoupled, so padding changes nothing. ``local`` is this rank's column range.
    """

    def __init__(self, masks: list[Tensor], block: int | None, cross_layers: bool) -> None:
        self.index = [m.reshape(-1).nonzero().squeeze(1) for m in masks]
        self.offsets, pos = [], 0
        for idx in self.index:
            self.offsets.append(pos)
            pos += (
                idx.numel() if block is None or cross_layers else -(-idx.numel() // block) * block
            )
        self.total = pos if block is None else -(-pos // block) * block
        if block is None or not dist.is_distributed():
            self.local = (0, self.total)
        else:
            b0, b1 = dist.shard_bounds(self.total // block)
            self.local = (b0 * block, b1 * block)

    def segments(self, flat: Tensor) -> list[Tensor]:
        return [flat[lo : lo + idx.numel()] for lo, idx in zip(self.offsets, self.index)]

    def fill(self, out: Tensor, rows: list[Tensor]) -> None:
        """Write (c, numel_i) per-parameter rows into ``out`` (c, local width), zeros elsewhere."""
        lo, hi = self.local
        out.zero_()
        for idx, off, src in zip(self.index, self.offsets, rows):
            a, b = max(lo, off), min(hi, off + idx.numel())
            if a < b:
                cols = idx[a - off : b - off].to(src.device)
                for r in range(src.shape[0]):  # one row at a time: no copy of the whole chunk
                    out[r, a - lo : b - lo] = src[r, cols].to(out.device, out.dtype)


class CompactLayout:
    """`BlockLayout` over each parameter's unpruned coordinates only (dynamic Fisher blocks).

    Parameter i's kept coordinates (flat indices ``index[i]``, in order) form a compacted
    vector of ``len(index[i])`` entries, cut into blocks of B consecutive entries (the last
    one zero-padded) and shared over ranks exactly as `BlockLayout` shares a dense layout.
    Parts, ``c0``/``c1`` included, refer to positions in the compacted vectors. ``take``
    gathers the kept coordinates; ``gather`` scatters them back, zeros at pruned coordinates.
    """

    def __init__(self, masks: list[Tensor], block_size: int) -> None:
        self.index = [m.reshape(-1).nonzero().squeeze(1) for m in masks]
        self.numels = [m.numel() for m in masks]
        self.compact = BlockLayout([i.numel() for i in self.index], block_size)
        self.block_size, self.parts = block_size, self.compact.parts

    def take(self, full: list[Tensor]) -> list[Tensor]:
        """This rank's pieces (..., c1 - c0) of per-parameter tensors (..., numel)."""
        out = []
        for p in self.parts:
            src = full[p.index]
            out.append(src[..., self.index[p.index][p.c0 : p.c1].to(src.device)])
        return out

    def gather(
        self, local: list[Tensor], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> list[Tensor]:
        """Per-parameter full (numel,) ``dtype`` vectors, zero at the pruned coordinates."""
        out = []
        for idx, n, vec in zip(self.index, self.numels, self.compact.gather(local, device, dtype)):
            full = torch.zeros(n, device=device, dtype=dtype)
            full[idx.to(device)] = vec
            out.append(full)
        return out
