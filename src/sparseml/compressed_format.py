"""Tensor layouts of compressed sparse checkpoints: bitmask, packed N:M, dense (pure tensor code).

A weight is "zero" when it compares equal to 0 (``+0.0``, ``-0.0``; NaN is a value; for
integer and bool tensors any set bit is a value). Zeros are not stored, except that the sign of
each ``-0.0`` (multiplying a negative weight by a 0/1 mask gives one) is kept in an optional
``negzero`` bit stream, so every layout reproduces the tensor bit for bit. Groups for N:M are
those of ``sparseml.masks``: ``m`` consecutive entries of the row-major flattening, i.e. along
the input dimension of the 2-D view ``(out, in * kh * kw)``; ``n`` is the number of zeros each
group has at least.

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

Every value moves through an integer view of its bits (never through float gather, scatter or
indexing): copies of float16/bfloat16 NaN payloads through half-precision kernels are not
guaranteed to keep their bits, integer copies are. Decoding runs in chunks of
:data:`CHUNK` entries so its scratch memory stays bounded whatever a file declares; decoding
checks that the parts fit together and raises :class:`LayoutError` where they do not.
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
CHUNK = 1 << 20  # entries decoded at a time: bounds the decoder's scratch memory (~50 MB)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Float types whose bit patterns are sign-magnitude with +0 and -0 (sign bit alone set = -0).
# The "fnuz" float8 types use that pattern for NaN and have no -0, so they stay dense.
SIGNED_ZERO_FLOATS = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)
_SHIFTS = torch.arange(8, dtype=torch.uint8)


class LayoutError(ValueError):
    """Stored parts that do not fit together (a corrupt or hostile file)."""


def has_layout(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` can be stored as bitmask or N:M (others stay dense)."""
    if dtype == torch.bool:
        return True
    if dtype.is_complex or dtype.itemsize not in _INT_OF_SIZE:
        return False
    return dtype in SIGNED_ZERO_FLOATS or not dtype.is_floating_point


def bits_view(tensor: Tensor) -> Tensor:
    """The flattened tensor as integers of its element size (shares memory when contiguous)."""
    if not has_layout(tensor.dtype):
        raise TypeError(f"dtype {tensor.dtype} has no compressed layout")
    flat = tensor.detach().reshape(-1).contiguous()
    return (
        flat.view(torch.uint8)
        if flat.dtype == torch.bool
        else flat.view(_INT_OF_SIZE[flat.element_size()])
    )


def _sign_bit(dtype: torch.dtype) -> int:
    """The integer (of :func:`bits_view`'s type) whose only set bit is the sign bit."""
    size = torch.empty((), dtype=dtype).element_size()
    return 0x80 if size == 1 else -(1 << (8 * size - 1))  # uint8 / two's complement minimum


def nonzero_mask(tensor: Tensor) -> Tensor:
    """Boolean tensor (flattened): True for values, False for zeros (``+0.0`` and ``-0.0``)."""
    if not has_layout(tensor.dtype):  # statistics only: these dtypes are stored dense
        return tensor.detach().reshape(-1) != 0
    bits = bits_view(tensor)
    if tensor.is_floating_point():  # every bit but the sign: NaN and subnormals are values
        magnitude = 0x7F if bits.dtype == torch.uint8 else ~_sign_bit(tensor.dtype)
        return (bits & magnitude) != 0
    return bits != 0


def negative_zeros(tensor: Tensor) -> Tensor:
    """Boolean tensor (flattened): True where the entry is ``-0.0``."""
    if not tensor.is_floating_point():
        return torch.zeros(tensor.numel(), dtype=torch.bool)
    return bits_view(tensor) == _sign_bit(tensor.dtype)


def pack_bits(bits: Tensor) -> Tensor:
    """1-D bool -> uint8, 8 entries per byte, the first in the least significant bit."""
    pad = (-bits.numel()) % 8
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(-1, 8)
    return (padded << _SHIFTS.to(bits.device)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, count: int, start: int = 0) -> Tensor:
    """Bits ``start .. start + count`` of a :func:`pack_bits` stream as a 1-D bool tensor.

    Only the bytes holding those bits are expanded, so chunked readers stay small.
    """
    first, last = start // 8, math.ceil((start + count) / 8)
    if last > packed.numel():
        raise LayoutError(f"a bit stream of {packed.numel()} bytes has no bit {start + count - 1}")
    window = packed.reshape(-1)[first:last]
    bits = (window.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    offset = start - 8 * first
    return bits.reshape(-1)[offset : offset + count].bool()


def check_padding(packed: Tensor, count: int, what: str) -> None:
    """The bits past the ``count`` a :func:`pack_bits` stream holds are 0, as written (a set
    one is a file this writer never produces: damaged or crafted)."""
    used = count % 8
    if used and packed.numel() and int(packed.reshape(-1)[-1]) >> used:
        raise LayoutError(
            f"{what}: bits past its {count} entries are set (not written by this format)"
        )


def check_bools(values: Tensor, what: str) -> None:
    """Stored bool bytes are 0 or 1 (torch treats other bytes inconsistently: 2 prints as True
    yet compares unequal to it)."""
    if values.dtype == torch.bool and values.numel() and int(values.view(torch.uint8).max()) > 1:
        raise LayoutError(
            f"{what} holds bool bytes other than 0 and 1 (not written by this format)"
        )


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


def nm_pattern_problem(n: object, m: object, shape: tuple[int, ...]) -> str:
    """Why ``n:m`` is not a pattern for ``shape`` ('' when it is): the one rule the writer
    (:func:`choose_layout`) and the reader share. ``n == m`` (a group of zeros only, nothing
    stored) is read for files written before writers kept one entry per group."""
    if type(n) is not int or type(m) is not int or not (2 <= m <= 256 and 0 < n <= m):
        return f"N:M pattern n={n!r}, m={m!r} is not allowed (0 < n <= m, 2 <= m <= 256)"
    if len(shape) < 2 or row_length(shape) % m:
        return f"shape {list(shape)} has rows not divisible into groups of {m}"
    return ""


@dataclass(frozen=True)
class Choice:
    """The layout chosen for one tensor and its stored size in bytes."""

    layout: str  # dense | bitmask | nm
    nbytes: int
    n: int = 0
    m: int = 0


def choose_layout(tensor: Tensor, nonzero: Tensor) -> Choice:
    """The smallest layout for ``tensor`` (dense on ties; packed N:M over bitmask on ties).

    N:M keeps at least one entry per group (``n < m``): an all-zero tensor (a fully pruned
    layer, a zero-initialised head) then costs 1/m of its values and the file's expansion on
    reading stays bounded by its stored bytes (``sparseml.compressed.MAX_EXPANSION``).
    """
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
        zeros = min_zeros_per_group(nonzero, shape, m)
        n = min(zeros, m - 1) if zeros else 0
        if n and not nm_pattern_problem(n, m, shape):
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


def encode_bitmask(tensor: Tensor, nonzero: Tensor) -> dict[str, Tensor]:
    values = bits_view(tensor)[nonzero].view(tensor.dtype)
    return _with_signs({"bitmask": pack_bits(nonzero), "values": values}, tensor, nonzero)


def encode_nm(tensor: Tensor, nonzero: Tensor, n: int, m: int) -> dict[str, Tensor]:
    """Keep ``m - n`` entries per group: all nonzeros, then the first zeros to fill the slots."""
    groups = nonzero.view(-1, m)
    key = (~groups).to(torch.int64) * m + torch.arange(m)  # nonzeros first, then by position
    idx = key.argsort(dim=1)[:, : m - n].sort(dim=1).values
    values = bits_view(tensor).view(-1, m).gather(1, idx).view(tensor.dtype)
    bits = (idx.reshape(-1, 1) >> torch.arange(bits_for(m))) & 1
    stored = torch.zeros_like(groups).scatter_(1, idx, True).view(-1)
    parts = {"values": values, "indices": pack_bits(bits.reshape(-1).bool())}
    return _with_signs(parts, tensor, stored)


class _Signs:
    """Restores ``-0.0`` entries chunk by chunk from the ``negzero`` stream (if any)."""

    def __init__(self, parts: dict[str, Tensor], dtype: torch.dtype, unstored: int) -> None:
        self.packed = parts.get("negzero")
        if self.packed is not None and (self.packed.dtype != torch.uint8 or self.packed.dim() != 1):
            raise LayoutError(
                f"negzero is {self.packed.dtype} {tuple(self.packed.shape)}, expected a uint8 bit "
                "stream (1-D)"
            )
        if self.packed is not None and self.packed.numel() != math.ceil(unstored / 8):
            raise LayoutError(
                f"negzero has {self.packed.numel()} bytes, {unstored} unstored entries need "
                f"{math.ceil(unstored / 8)}"
            )
        if self.packed is not None:
            check_padding(self.packed, unstored, "negzero")
        self.sign = _sign_bit(dtype) if self.packed is not None else 0
        self.done = 0

    def apply(self, out: Tensor, stored: Tensor) -> None:
        """``out`` (integer bits) and ``stored`` (bool) are one chunk, in order."""
        if self.packed is None:
            return
        free = ~stored
        count = int(free.sum())
        negative = unpack_bits(self.packed, count, self.done)
        self.done += count
        where = free.nonzero().squeeze(1)[negative]
        out[where] = self.sign


def decode_bitmask(parts: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Rebuild the tensor; :class:`LayoutError` when the bitmask and values disagree."""
    numel = math.prod(shape)
    mask, values = parts["bitmask"], parts["values"]
    if mask.dtype != torch.uint8 or mask.numel() != math.ceil(numel / 8):
        raise LayoutError(
            f"bitmask has {mask.numel()} bytes, shape {list(shape)} needs {math.ceil(numel / 8)}"
        )
    if values.dim() != 1 or values.dtype != dtype:
        raise LayoutError(f"values are {values.dtype} {list(values.shape)}, not 1-D {dtype}")
    check_padding(mask, numel, "bitmask")
    check_bools(values, "values")
    vals = bits_view(values)
    out = torch.zeros(numel, dtype=vals.dtype)
    signs = _Signs(parts, dtype, numel - values.numel())
    used = 0
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        nonzero = unpack_bits(mask, count, start)
        k = int(nonzero.sum())
        if used + k > vals.numel():
            raise LayoutError(
                f"bitmask marks {used + k}+ nonzeros but {vals.numel()} values are stored"
            )
        out[start : start + count][nonzero] = vals[used : used + k]
        signs.apply(out[start : start + count], nonzero)
        used += k
    if used != vals.numel():
        raise LayoutError(f"bitmask marks {used} nonzeros but {vals.numel()} values are stored")
    return out.view(dtype).view(shape)


def decode_nm(
    parts: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype, n: int, m: int
) -> Tensor:
    """Rebuild the tensor; :class:`LayoutError` when values, indices or positions do not fit."""
    problem = nm_pattern_problem(n, m, shape)
    if problem:
        raise LayoutError(problem)
    numel = math.prod(shape)
    groups, keep, width = numel // m, m - n, bits_for(m)
    values, indices = parts["values"], parts["indices"]
    if tuple(values.shape) != (groups, keep) or values.dtype != dtype:
        raise LayoutError(
            f"values are {values.dtype} {list(values.shape)}, {n}:{m} of {list(shape)} needs "
            f"{dtype} {[groups, keep]}"
        )
    need = math.ceil(groups * keep * width / 8)
    if indices.dtype != torch.uint8 or indices.numel() != need:
        raise LayoutError(f"N:M indices have {indices.numel()} bytes, {need} expected")
    check_padding(indices, groups * keep * width, "N:M indices")
    check_bools(values, "values")
    vals = bits_view(values).view(groups, keep)
    out = torch.zeros(groups, m, dtype=vals.dtype)
    signs = _Signs(parts, dtype, numel - values.numel())
    step = max(1, CHUNK // m)
    weights = 1 << torch.arange(width, dtype=torch.int32)
    for g in range(0, groups, step):
        rows = min(step, groups - g)
        bits = unpack_bits(indices, rows * keep * width, g * keep * width)
        pos = (bits.view(-1, width).to(torch.int32) * weights).sum(dim=1).view(rows, keep)
        if keep and not (bool((pos < m).all()) and bool((pos.diff(dim=1) > 0).all())):
            raise LayoutError("N:M indices are out of range or not increasing within a group")
        chunk = out[g : g + rows]
        chunk.scatter_(1, pos, vals[g : g + rows])
        stored = torch.zeros(chunk.shape, dtype=torch.bool).scatter_(1, pos, True)
        signs.apply(chunk.view(-1), stored.view(-1))
    return out.view(dtype).view(shape)
