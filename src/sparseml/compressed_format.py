"""Tensor layouts of compressed sparse checkpoints: bitmask, packed N:M, dense (pure tensor code).

A weight is "zero" when it compares equal to 0 (``+0.0``, ``-0.0``; NaN is a value; for
integer and bool tensors any set bit is a value). Zeros are not stored, except that the sign of
each ``-0.0`` (multiplying a negative weight by a 0/1 mask gives one) is kept in an optional
``negzero`` bit stream, so every layout reproduces the tensor bit for bit. Groups for N:M are those of ``sparseml.masks``:
``m`` consecutive entries of the row-major flattening, i.e. along the input dimension of the
2-D view ``(out, in * kh * kw)``; ``n`` is the number of zeros each group has at least.

Layouts (the byte format is documented in ``docs/compressed-format.md``):

* ``bitmask``: ``bitmask`` (uint8, ``ceil(numel / 8)``; bit ``i % 8`` of byte ``i // 8`` is set
  when entry ``i`` is nonzero) and ``values`` (the nonzeros in row-major order, original dtype);
* ``nm``: ``values`` of shape ``(groups, m - n)`` (the kept entries of each group, by position)
  and ``indices`` (uint8 bit stream of each kept entry's position in its group, ``bits_for(m)``
  bits each, least significant bit first, groups in order);
* ``dense``: the tensor as it is.

``bitmask`` and ``nm`` may add ``negzero`` (uint8 bit stream like ``bitmask``): one bit per
entry not stored in ``values`` (row-major order), set where that entry is ``-0.0``; present only
when the tensor has such an entry.
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


def nonzero_mask(tensor: Tensor) -> Tensor:
    """Boolean tensor (flattened): True for values, False for zeros (``+0.0`` and ``-0.0``)."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.clone()
    if flat.is_complex() or flat.element_size() not in _INT_OF_SIZE:
        raise TypeError(f"dtype {flat.dtype} has no compressed layout")
    if flat.is_floating_point():
        return flat != 0  # NaN != 0: a value
    return flat.contiguous().view(_INT_OF_SIZE[flat.element_size()]) != 0


def negative_zeros(tensor: Tensor) -> Tensor:
    """Boolean tensor (flattened): True where the entry is ``-0.0``."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_floating_point():
        return torch.zeros(flat.shape, dtype=torch.bool)
    return (flat == 0) & torch.signbit(flat)


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
    # -0.0 entries need their sign bits (an upper bound: all unstored entries get one)
    signs = bool(negative_zeros(tensor).any())

    def sign_bytes(stored: int) -> int:
        return math.ceil((numel - stored) / 8) + ENTRY_OVERHEAD if signs else 0

    size = math.ceil(numel / 8) + nnz * item + ENTRY_OVERHEAD + sign_bytes(nnz)
    candidates = [Choice("bitmask", size)]
    for m in NM_GROUPS:
        n = min_zeros_per_group(nonzero, shape, m)
        if n:
            kept = numel // m * (m - n)
            size = kept * item + math.ceil(kept * bits_for(m) / 8) + ENTRY_OVERHEAD
            candidates.append(Choice("nm", size + sign_bytes(kept), n, m))
    smallest = min(candidates, key=lambda c: (c.nbytes, c.layout != "nm"))
    return smallest if smallest.nbytes < best.nbytes else best


def _with_signs(parts: dict[str, Tensor], tensor: Tensor, stored: Tensor) -> dict[str, Tensor]:
    """Add ``negzero`` (over the entries not stored) when any of them is ``-0.0``."""
    negative = negative_zeros(tensor)[~stored]
    if bool(negative.any()):
        parts["negzero"] = pack_bits(negative)
    return parts


def _restore_signs(out: Tensor, parts: dict[str, Tensor], stored: Tensor) -> Tensor:
    if "negzero" in parts:
        unstored = (~stored).nonzero().squeeze(1)
        negative = unpack_bits(parts["negzero"], unstored.numel())
        out[unstored[negative]] = -0.0
    return out


def encode_bitmask(tensor: Tensor, nonzero: Tensor) -> dict[str, Tensor]:
    values = tensor.detach().reshape(-1)[nonzero].clone()
    return _with_signs({"bitmask": pack_bits(nonzero), "values": values}, tensor, nonzero)


def decode_bitmask(parts: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    numel = math.prod(shape)
    nonzero = unpack_bits(parts["bitmask"], numel)
    out = torch.zeros(numel, dtype=dtype)
    out[nonzero] = parts["values"]
    return _restore_signs(out, parts, nonzero).view(shape)


def _positions(parts: dict[str, Tensor], m: int) -> Tensor:
    """(groups, m - n) in-group positions of the stored values, from the ``indices`` stream."""
    values = parts["values"]
    width = bits_for(m)
    bits = unpack_bits(parts["indices"], values.numel() * width).view(-1, width).to(torch.int64)
    return (bits << torch.arange(width)).sum(dim=1).view(values.shape)


def encode_nm(tensor: Tensor, nonzero: Tensor, n: int, m: int) -> dict[str, Tensor]:
    """Keep ``m - n`` entries per group: all nonzeros, then the first zeros to fill the slots."""
    groups = nonzero.view(-1, m)
    key = (~groups).to(torch.int64) * m + torch.arange(m)  # nonzeros first, then by position
    idx = key.argsort(dim=1)[:, : m - n].sort(dim=1).values
    values = tensor.detach().reshape(-1, m).gather(1, idx)
    bits = (idx.reshape(-1, 1) >> torch.arange(bits_for(m))) & 1
    stored = torch.zeros_like(groups).scatter_(1, idx, True).view(-1)
    parts = {"values": values, "indices": pack_bits(bits.reshape(-1).bool())}
    return _with_signs(parts, tensor, stored)


def decode_nm(
    parts: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype, m: int
) -> Tensor:
    values = parts["values"]
    idx = _positions(parts, m)
    out = torch.zeros(values.shape[0], m, dtype=dtype)
    out.scatter_(1, idx, values)
    stored = torch.zeros(out.shape, dtype=torch.bool).scatter_(1, idx, True).view(-1)
    return _restore_signs(out.view(-1), parts, stored).view(shape)


def nm_indices_valid(parts: dict[str, Tensor], m: int) -> bool:
    """Positions inside the group and strictly increasing in each group (so no duplicates)."""
    idx = _positions(parts, m)
    return bool((idx < m).all()) and bool((idx.diff(dim=1) > 0).all())
