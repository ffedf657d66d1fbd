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
def _indices(block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(tril, diag): the packed entries' flat positions in a B x B block, and the packed
    entries of the diagonal."""
    rows, cols = torch.tril_indices(block, block)
    diag = torch.arange(1, block + 1).cumsum(0) - 1
    return (rows * block + cols).to(device), diag.to(device)


def pack(full: Tensor, out: Tensor | None = None) -> Tensor:
    """(n, B, B) symmetric -> (n, B (B + 1) / 2): the lower triangles, in ``full``'s dtype
    (into ``out`` when given: contiguous (n, B (B + 1) / 2))."""
    n, block = full.shape[0], full.shape[-1]
    tril, _ = _indices(block, full.device)
    if not full.is_contiguous() and full.mT.is_contiguous():
        full = full.mT  # symmetric: the transposed storage holds the same numbers
    flat = full.reshape(n, block * block)
    return flat.index_select(1, tril) if out is None else torch.index_select(flat, 1, tril, out=out)


def unpack(
    packed: Tensor, block: int, out: Tensor | None = None, *, lower_only: bool = False
) -> Tensor:
    """(n, B (B + 1) / 2) -> (n, B, B) symmetric, in ``packed``'s dtype.

    ``out`` (n, B, >= B), if given, receives the blocks in ``out[..., :B]``. Row i of a packed
    triangle is contiguous (entries (i, 0..i)), so a block is filled by 2 B strided copies
    (the row, then the same numbers as column i above the diagonal): about twice as fast as
    one gather of B^2 indices. ``lower_only`` writes the rows only (B copies), for a
    factorization that reads the lower triangle; the rest of ``out`` is left as it is.
    """
    n = packed.shape[0]
    if out is None:
        out = torch.empty((n, block, block), dtype=packed.dtype, device=packed.device)
    for i in range(block):
        o = i * (i + 1) // 2
        out[:, i, : i + 1] = packed[:, o : o + i + 1]
        if not lower_only:
            out[:, :i, i] = packed[:, o : o + i]
    return out[..., :block]


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
        rows = self.data[start : start + full.shape[0]]
        if full.device == rows.device:
            pack(full, out=rows)
        else:
            rows.copy_(pack(full))

    def rows(
        self, start: int, n: int, out: Tensor | None = None, *, lower_only: bool = False
    ) -> Tensor:
        """Blocks start .. start + n - 1 as full float64 (n, B, B), into ``out`` if given
        (``lower_only``: the lower triangles, see `unpack`)."""
        src = self.data[start : start + n]
        out = None if out is None else out[: src.shape[0]]
        return unpack(src, self.block, out, lower_only=lower_only)

    def unpack_into(self, index, out: Tensor) -> None:
        """Write blocks ``index`` (slice or index tensor) into ``out`` (n, B, >= B)[..., :B]."""
        unpack(self.data[index], self.block, out)

    def diagonal(self, offset: int = 0, dim1: int = -2, dim2: int = -1) -> Tensor:
        """(n_b, B) float64 diagonals."""
        if offset != 0 or {dim1 % 3, dim2 % 3} != {1, 2}:
            raise ValueError("SymBlocks.diagonal takes the blocks' own diagonal only")
        _, diag = _indices(self.block, self.device)
        return self.data.index_select(1, diag)

    def to(self, device: torch.device | str) -> SymBlocks:
        return SymBlocks(self.data.to(device), self.block)

    def cpu(self) -> SymBlocks:
        return self.to("cpu")

    def full(self) -> Tensor:
        """All blocks as one (n_b, B, B) float64 tensor (tests, small problems)."""
        return unpack(self.data, self.block)
