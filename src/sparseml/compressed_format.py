"""Tensor layouts of compressed sparse checkpoints: bitmask, packed N:M, dense (pure tensor code).

A weight is "zero" here when all its bits are zero, so ``-0.0`` and NaN count as values and
every layout reproduces the tensor bit for bit. Groups for N:M are those of ``sparseml.masks``:
``m`` consecutive entries of the row-major flattening, i.e. along the input dimension of the
2-D view ``(out, in * kh * kw)``; ``n`` is the number of zeros each group has at least.

Layouts (the byte format is documented in ``docs/compressed-format.md``):

* ``bitmask``: ``bitmask`` (uint8, ``ceil(numel / 8)``; bit ``i % 8`` of byte ``i // 8`` is set
  when entry ``i`` is nonzero) and ``values`` (the nonzeros in row-major order, original dtype);
* ``nm``: ``values`` of shape ``(groups, m - n)`` (the kept entries of each group, by position)
  and ``indices`` (uint8 bit stream of each kept entry's position in its group, ``bits_for(m)``
  bits each, least significant bit first, groups in order);
* ``dense``: the tensor as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NM_GROUPS = (4, 8, 16)  # the group sizes M tried when choosing a layout
# Bytes a stored tensor adds to the safetensors header (name, dtype, shape, offsets, CRC):
# tiny tensors stay dense, where two entries would cost more than the zeros save.
ENTRY_OVERHEAD = 160
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def nonzero_bits(tensor: Tensor) -> Tensor:
    """Boolean tensor (flattened): True where the entry's bits are not all zero."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.clone()
    as_int = _INT_OF_SIZE.get(flat.element_size())
    if as_int is None or flat.is_complex():
        raise TypeError(f"dtype {flat.dtype} has no compressed layout")
    return flat.contiguous().view(as_int) != 0


def pack_bits(bits: Tensor) -> Tensor:
    """1-D bool -> uint8, 8 entries per byte, the first in the least significant bit."""
    pad = (-bits.numel()) % 8
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(-1, 8)
    return (padded << _SHIFTS.to(bits.device)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a 1-D bool tensor."""
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()


def bits_for(m: int) -> int:
    """Bits per in-group position for groups of ``m`` (2 for 2:4, 3 for 4:8)."""
    return max(1, math.ceil(math.log2(m)))


def row_length(shape: tuple[int, ...]) -> int:
    numel = math.prod(shape)
    return numel if len(shape) <= 1 else numel // shape[0] if shape[0] else 0


def min_zeros_per_group(nonzero: Tensor, shape: tuple[int, ...], m: int) -> int | None:
    """The fewest zeros any group of ``m`` holds (None when groups do not tile the rows)."""
    if len(shape) < 2 or not nonzero.numel() or row_length(shape) % m:
        return None
    return int((~nonzero).view(-1, m).sum(dim=1).min())


def nm_share(nonzero: Tensor, shape: tuple[int, ...], n: int, m: int) -> float | None:
    """Share of the groups of ``m`` holding at least ``n`` zeros (None when not groupable)."""
    if len(shape) < 2 or not nonzero.numel() or row_length(shape) % m:
        return None
    return float(((~nonzero).view(-1, m).sum(dim=1) >= n).float().mean())


@dataclass(frozen=True)
class Choice:
    """The layout chosen for one tensor and its stored size in bytes."""

    layout: str  # dense | bitmask | nm
    nbytes: int
    n: int = 0
    m: int = 0


def choose_layout(tensor: Tensor, nonzero: Tensor) -> Choice:
    """The smallest layout for ``tensor`` (dense on ties; packed N:M over bitmask on ties)."""
    item, numel = tensor.element_size(), tensor.numel()
    shape = tuple(tensor.shape)
    best = Choice("dense", numel * item)
    nnz = int(nonzero.sum())
    bitmask = Choice("bitmask", math.ceil(numel / 8) + nnz * item + ENTRY_OVERHEAD)
    candidates = [bitmask]
    for m in NM_GROUPS:
        n = min_zeros_per_group(nonzero, shape, m)
        if n:
            kept = numel // m * (m - n)
            size = kept * item + math.ceil(kept * bits_for(m) / 8) + ENTRY_OVERHEAD
            candidates.append(Choice("nm", size, n, m))
    smallest = min(candidates, key=lambda c: (c.nbytes, c.layout != "nm"))
    return smallest if smallest.nbytes < best.nbytes else best


def encode_bitmask(tensor: Tensor, nonzero: Tensor) -> dict[str, Tensor]:
    return {"bitmask": pack_bits(nonzero), "values": tensor.detach().reshape(-1)[nonzero].clone()}


def decode_bitmask(parts: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    numel = math.prod(shape)
    nonzero = unpack_bits(parts["bitmask"], numel)
    out = torch.zeros(numel, dtype=dtype)
    out[nonzero] = parts["values"]
    return out.view(shape)


def encode_nm(tensor: Tensor, nonzero: Tensor, n: int, m: int) -> dict[str, Tensor]:
    """Keep ``m - n`` entries per group: all nonzeros, then the first zeros to fill the slots."""
    groups = nonzero.view(-1, m)
    key = (~groups).to(torch.int64) * m + torch.arange(m)  # nonzeros first, then by position
    idx = key.argsort(dim=1)[:, : m - n].sort(dim=1).values
    values = tensor.detach().reshape(-1, m).gather(1, idx)
    bits = (idx.reshape(-1, 1) >> torch.arange(bits_for(m))) & 1
    return {"values": values, "indices": pack_bits(bits.reshape(-1).bool())}


def decode_nm(
    parts: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype, m: int
) -> Tensor:
    values = parts["values"]
    width = bits_for(m)
    bits = unpack_bits(parts["indices"], values.numel() * width).view(-1, width).to(torch.int64)
    idx = (bits << torch.arange(width)).sum(dim=1).view(values.shape)
    out = torch.zeros(values.shape[0], m, dtype=dtype)
    out.scatter_(1, idx, values)
    return out.view(shape)


def nm_indices_valid(parts: dict[str, Tensor], m: int) -> bool:
    """Positions inside the group and strictly increasing in each group (so no duplicates)."""
    values = parts["values"]
    width = bits_for(m)
    bits = unpack_bits(parts["indices"], values.numel() * width).view(-1, width).to(torch.int64)
    idx = (bits << torch.arange(width)).sum(dim=1).view(values.shape)
    return bool((idx < m).all()) and bool((idx.diff(dim=1) > 0).all())
