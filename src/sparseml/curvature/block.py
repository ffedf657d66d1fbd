"""Block-diagonal Fisher estimates from gradient chunks: per-block inverses and shared blocks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from sparseml.dist import on_all_ranks
from sparseml.kernels.fast_cap import accumulate_shared_fisher, group_count
from sparseml.kernels.fisher import num_blocks
from sparseml.kernels.fisher_build import BlockFisherBuilder
from sparseml.kernels.packed import SymBlocks
from sparseml.progress import Progress


def block_fisher_inverses(
    chunks: Iterable[list[Tensor]],
    layout,
    *,
    num_grads: int,
    damp: float,
    devices: list[torch.device],
    dtype: torch.dtype,
    owner: str,
) -> list[SymBlocks]:
    """H (n_b, B, B) for each of this rank's parts of ``layout``, as packed float64 triangles.

    Args:
        chunks: gradient chunks (one ``(c, numel_i)`` tensor per parameter), ``num_grads``
            samples in all. layout: a `sparseml.layouts` layout with ``block_size``, ``parts``
            and ``take``. damp: absolute lambda > 0.
        devices: where parameter i's blocks live (the ``fisher_inv_device`` or its own).
        dtype: the work dtype (stored samples and an m-space H).
        owner: named in errors; the inversion fails on every rank if it fails on one.

    With m >= B the samples are summed into float64 Grams (batched GEMMs) and inverted in place
    with a float64 Cholesky (accurate down to damp ~1e-10 ||G^T G / m||); with m < B the exact
    sample-space form is used. Either way H is `sparseml.kernels.packed.SymBlocks`: float64
    lower triangles in (B + 1) / B times the memory of float32 blocks. See `BlockFisherBuilder`.
    """
    bsz = layout.block_size
    builders = [
        BlockFisherBuilder(p.c1 - p.c0, bsz, num_grads, damp, device=devices[p.index], dtype=dtype)
        for p in layout.parts
    ]
    _feed(chunks, layout, builders)  # no chunk outlives the loop (they can be GBs)
    return on_all_ranks(lambda: _finish_all(builders, owner), owner)


def _finish_all(builders: list[BlockFisherBuilder], owner: str) -> list[SymBlocks]:
    """Invert every part's blocks, with progress (minutes at DeiT sizes: it must show)."""
    sizes = [num_blocks(b.d, b.block_size) for b in builders]
    out = []
    with Progress(f"{owner}: Fisher inverse", sum(sizes), "blocks") as progress:
        for builder in builders:
            out.append(builder.finish(on_blocks=progress.update))
    return out


def _feed(chunks: Iterable[list[Tensor]], layout, builders: list[BlockFisherBuilder]) -> None:
    for chunk in chunks:
        for piece, builder in zip(layout.take(chunk), builders):
            builder.add(piece)
        chunk = piece = None  # not alive while the next chunk is drawn


def shared_block_fishers(
    chunks: Iterable[list[Tensor]],
    block_size: int | list[int],
    devices: list[torch.device],
    group_rows: list[int | None] | None = None,
) -> tuple[list[Tensor], int, list[Tensor]]:
    """One (B, B) float64 Gram sum per parameter (rows of B weights share it), the sample
    count, and per parameter each row's gradient energy sum_n ||G_n[r]||^2 (float64,
    ceil(numel / B) rows): FastCAP's Fisher. ``block_size``: one B for all parameters, or one
    per parameter. ``group_rows[i]``: parameter i gets one Fisher per run of that many
    consecutive rows, (G, B, B) (None: one for all its rows). Every rank computes every
    parameter's (the samples are equal)."""
    blocks = block_size if isinstance(block_size, list) else [block_size] * len(devices)
    groups = group_rows or [None] * len(devices)
    fishers: list[Tensor] | None = None
    energies: list[Tensor] | None = None
    count = 0
    for chunk in chunks:
        if energies is None:
            rows = [-(-g.shape[1] // b) for g, b in zip(chunk, blocks)]
            energies = [
                torch.zeros(r, dtype=torch.float64, device=d) for r, d in zip(rows, devices)
            ]
            fishers = [
                torch.zeros(
                    (b, b) if k is None else (group_count(r, k), b, b),
                    dtype=torch.float64,
                    device=d,
                )
                for r, b, k, d in zip(rows, blocks, groups, devices)
            ]
        for grads, F, energy, k in zip(chunk, fishers, energies, groups):
            accumulate_shared_fisher(grads, F.shape[-1], out=F, row_energy=energy, group_rows=k)
        count += chunk[0].shape[0]
        chunk = grads = None  # not alive while the next chunk is drawn
    if fishers is None:
        fishers = [
            torch.zeros(b, b, dtype=torch.float64, device=d) for b, d in zip(blocks, devices)
        ]
    return fishers, count, energies or []
