"""Symmetric B x B blocks kept as their float64 lower triangles.

A float64 lower triangle takes B (B + 1) / 2 x 8 bytes: (B + 1) / B times a full float32 block.
The block Fisher keeps its Gram matrices and then its inverses this way, so small damps stay
exact (float64 sums and factorizations, see `sparseml.kernels.fisher`) in the memory of
float32 blocks; the kernels that use H unpack a few blocks at a time into float64 working
batches.

`SymBlocks` behaves like the (n_b, B, B) float64 tensor it stands for where the kernels need
it: ``shape``, ``dtype``, ``device``, ``dim()``, indexing by an int, a slice or an index tensor
(which returns full float64 blocks), ``diagonal()``. Packed entry k of a block holds row
``r[k]``, column ``c[k]`` with r >= c, row by row (torch.tril_indices order).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def packed_numel(block: int) -> int:
    """Entries of one packed block: B (B + 1) / 2."""
    return block * (block + 1) // 2


@functools.lru_cache(maxsize=32)
def _indices(block: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(tril, full, diag): the packed entries' flat positions in a B x B block; for every
    flat position of the block its packed entry; the packed entries of the diagonal."""
    rows, cols = torch.tril_indices(block, block)
    tril = rows * block + cols
    where = torch.empty(block, block, dtype=torch.long)
    where[rows, cols] = torch.arange(rows.numel())
    where[cols, rows] = torch.arange(rows.numel())
    diag = where.diagonal().clone()
    return tril.to(device), where.flatten().to(device), diag.to(device)


def pack(full: Tensor) -> Tensor:
    """(n, B, B) -> (n, B (B + 1) / 2): the lower triangles, in ``full``'s dtype."""
    n, block = full.shape[0], full.shape[-1]
    tril, _, _ = _indices(block, full.device)
    return full.reshape(n, block * block).index_select(1, tril)


def unpack(packed: Tensor, block: int) -> Tensor:
    """(n, B (B + 1) / 2) -> (n, B, B) symmetric, in ``packed``'s dtype."""
    _, full, _ = _indices(block, packed.device)
    return packed.index_select(1, full).view(packed.shape[0], block, block)


class SymBlocks:
    """n_b symmetric float64 blocks of size B in (n_b, B (B + 1) / 2) storage (``data``)."""

    dtype = torch.float64

    def __init__(self, data: Tensor, block: int) -> None:
        if data.dim() != 2 or data.shape[1] != packed_numel(block) or data.dtype != self.dtype:
            raise ValueError(
                f"packed blocks must be float64 (n_b, {packed_numel(block)}) for B={block}, "
                f"got {data.dtype} {tuple(data.shape)}"
            )
        self.data, self.block = data, block

    @classmethod
    def zeros(cls, n_b: int, block: int, device: torch.device | str = "cpu") -> SymBlocks:
        data = torch.zeros(n_b, packed_numel(block), dtype=cls.dtype, device=device)
        return cls(data, block)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.block, self.block))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * 8

    def dim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index) -> Tensor:
        """Full float64 blocks: (B, B) for an int, (n, B, B) for a slice or index tensor."""
        if isinstance(index, int):
            return unpack(self.data[index : index + 1], self.block)[0]
        return unpack(self.data[index], self.block)

    def write(self, start: int, full: Tensor) -> None:
        """Store the lower triangles of ``full`` (n, B, B) as blocks start .. start + n - 1."""
        self.data[start : start + full.shape[0]] = pack(full)

    def unpack_into(self, index, out: Tensor, rows: int = 32) -> None:
        """Write blocks ``index`` (slice or index tensor) into ``out`` (n, B, >= B)[..., :B],
        ``rows`` rows at a time (no (n, B, B) temporary)."""
        _, full, _ = _indices(self.block, self.device)
        src, B = self.data[index], self.block
        for r in range(0, B, rows):
            pick = full[r * B : min(B, r + rows) * B]
            out[:, r : r + rows, :B] = src.index_select(1, pick).view(src.shape[0], -1, B)

    def diagonal(self, offset: int = 0, dim1: int = -2, dim2: int = -1) -> Tensor:
        """(n_b, B) float64 diagonals."""
        if offset != 0 or {dim1 % 3, dim2 % 3} != {1, 2}:
            raise ValueError("SymBlocks.diagonal takes the blocks' own diagonal only")
        _, _, diag = _indices(self.block, self.device)
        return self.data.index_select(1, diag)

    def to(self, device: torch.device | str) -> SymBlocks:
        return SymBlocks(self.data.to(device), self.block)

    def cpu(self) -> SymBlocks:
        return self.to("cpu")

    def full(self) -> Tensor:
        """All blocks as one (n_b, B, B) float64 tensor (tests, small problems)."""
        return unpack(self.data, self.block)
