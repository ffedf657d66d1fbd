"""Building block-Fisher inverses from streamed gradient samples: the Gram path (packed float64
Grams inverted in place, `sparseml.kernels.fisher`) or, with fewer samples than the block size,
the m x m sample-space form. The layout rule and the precision notes are in
`sparseml.kernels.fisher`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sparseml.errors import NumericalError
from sparseml.kernels.chunking import chunk_blocks, for_each_chunk
from sparseml.kernels.fisher import (
    _check_block_size,
    _check_num_grads_damp,
    _compiled_gram,
    accumulate_block_gram,
    invert_block_fisher,
    num_blocks,
    to_blocks,
)
from sparseml.kernels.packed import SymBlocks, packed_numel
from sparseml.kernels.precision import work_dtype


def mspace_block_inverse(
    grads: Tensor | list[Tensor],
    block_size: int,
    damp: float,
    *,
    dtype: torch.dtype = torch.float32,
    blocks_per_chunk: int | None = None,
    packed: bool = False,
) -> Tensor | SymBlocks:
    """H (n_b, B, B) from the m x m "sample space" form, meant for m < B.

    By Woodbury, (damp*I + G_b^T G_b / m)^{-1} = (I - G_b^T K_b^{-1} G_b) / damp with
    K_b = m*damp*I_m + G_b G_b^T = L_b L_b^T. With Z_b = L_b^{-1} G_b (m, B), H_b =
    (I - Z_b^T Z_b) / damp. Everything runs in float64 from the gradients themselves and the
    B x B Gram is never formed, so this is accurate for any damp. Cost per block: m^2 B
    (K, solve) + m B^2 (Z^T Z), i.e. cheaper than the Gram path when m < B.

    Args:
        grads: (m, d) gradient samples, or a list of (c_i, d) chunks of them (used as they
            are: no (m, d) copy is made). dtype: dtype of the returned H.
        packed: return H as float64 `SymBlocks` (exact, the memory of float32 blocks) instead.
    """
    _check_block_size(block_size)
    pieces = list(grads) if isinstance(grads, (list, tuple)) else [grads]
    if not pieces or any(g.dim() != 2 or g.shape[1] != pieces[0].shape[1] for g in pieces):
        shapes = [tuple(g.shape) for g in pieces]
        raise ValueError(f"grads must be (m, d) or (c_i, d) chunks, got shapes {shapes}")
    m, d = sum(g.shape[0] for g in pieces), pieces[0].shape[1]
    device = pieces[0].device
    _check_num_grads_damp(m, damp)
    n_b = num_blocks(d, block_size)
    if packed:
        H = SymBlocks(
            torch.empty(n_b, packed_numel(block_size), dtype=torch.float64, device=device),
            block_size,
        )
    else:
        H = torch.empty(n_b, block_size, block_size, dtype=dtype, device=device)
    step = blocks_per_chunk or chunk_blocks(block_size * max(block_size, m), device)
    if device.type == "cpu":
        step = min(step, -(-n_b // torch.get_num_threads()))

    def invert_chunk(s: int) -> None:
        cols = slice(s * block_size, (s + step) * block_size)
        g = to_blocks(torch.cat([x[:, cols].double() for x in pieces]), block_size)
        g = g.transpose(0, 1)  # (n, m, B)
        bad = ~torch.isfinite(g.sum(dim=(1, 2)))  # as in invert_block_fisher
        if bad.any():
            raise NumericalError(f"Fisher block {s + int(bad.nonzero()[0])} has NaN/Inf gradients")
        k = torch.bmm(g, g.transpose(1, 2))
        k.diagonal(dim1=-2, dim2=-1).add_(m * damp)
        chol, info = torch.linalg.cholesky_ex(k)
        if info.any():
            raise NumericalError(
                f"Fisher block {s + int(info.nonzero()[0])}: m*damp*I + G G^T is not positive "
                f"definite with damp={damp:g}; use a larger damp"
            )
        z = torch.linalg.solve_triangular(chol, g, upper=False)
        h = torch.bmm(z.transpose(1, 2), z).neg_()
        h.diagonal(dim1=-2, dim2=-1).add_(1.0)
        if packed:
            H.write(s, h.div_(damp))
        else:
            H[s : s + step] = h.div_(damp)

    for_each_chunk(invert_chunk, n_b, step, device)
    return H


class BlockFisherBuilder:
    """Streams gradient samples of one (d,) vector into its block inverses H (n_b, B, B).

    The single entry point of the block Fisher, used by the pruners and the benchmarks alike.
    With fewer samples than the block size (m < B, or ``mspace=True``) the chunks are kept as
    they come (no copy when they are in ``dtype`` on ``device`` and not a small slice of a
    larger tensor) and `mspace_block_inverse` applies Woodbury in sample space (exact for any
    damp); otherwise each chunk is added to packed float64 Grams with batched GEMMs and
    `invert_block_fisher` inverts them in place. Either way H is float64 `SymBlocks` (float64
    lower triangles: exact, in (B + 1) / B times the memory of float32 blocks). With
    ``gram_dtype=torch.float32`` (a control for the precision tests, not for production) the
    Gram and H are full float32 blocks instead. ``num_grads`` is the number of samples that will
    be added (more is an error); the normalisation uses the number actually added.

    Args:
        d: coordinates of the vector. block_size: B. num_grads: m. damp: lambda > 0.
        device: where the Gram or the stored samples (and H) live.
        dtype: dtype of stored samples and of an m-space H (the work dtype).
    """

    def __init__(
        self,
        d: int,
        block_size: int,
        num_grads: int,
        damp: float,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        gram_dtype: torch.dtype = torch.float64,
        mspace: bool | None = None,
    ) -> None:
        _check_num_grads_damp(num_grads, damp)
        self.d, self.block_size, self.damp, self.dtype = d, block_size, damp, dtype
        self.mspace = (num_grads < block_size) if mspace is None else mspace
        self.count = 0
        self.num_grads, self.device = num_grads, torch.device(device)
        n_b = num_blocks(d, block_size)
        # fresh: the packed Grams are not yet written (the first chunk writes them, so no
        # zero-filling pass); last: the final chunk, added inside the inversion (`finish`)
        self.fresh, self.last = False, None
        if self.mspace:
            self.store: Tensor | SymBlocks | list[Tensor] = []
        elif gram_dtype == torch.float64:
            shape = (n_b, packed_numel(block_size))
            data = torch.empty(shape, dtype=torch.float64, device=self.device)
            self.store, self.fresh = SymBlocks(data, block_size), True
        else:
            shape = (n_b, block_size, block_size)
            self.store = torch.zeros(shape, device=device, dtype=gram_dtype)

    def add(self, grads: Tensor) -> None:
        """Add a (c, d) chunk of samples. The chunk that completes ``num_grads`` may be held
        as it is (not copied) until `finish` adds it inside the inversion: do not overwrite it
        before then."""
        if grads.dim() != 2 or grads.shape[1] != self.d:
            raise ValueError(f"grads must have shape (c, {self.d}), got {tuple(grads.shape)}")
        c = grads.shape[0]
        if self.count + c > self.num_grads:  # the held last chunk may be overwritten by then
            raise RuntimeError(f"more than num_grads={self.num_grads} samples added")
        if self.mspace:
            # Keep a view only when it does not pin a much larger tensor (another rank's part)
            # and needs no conversion; otherwise a compact copy.
            base = grads if grads._base is None else grads._base
            shared = grads.numel() * 2 < base.numel()
            kept = grads.to(self.device, self.dtype)
            self.store.append(kept.clone() if kept is grads and shared else kept)
        else:
            if c and self.count + c == self.num_grads and _compiled_gram(grads, self.store):
                self.last = grads  # a view of the sampler's chunk: no copy, no pass yet
            else:
                self._accumulate(grads)
        self.count += c

    def _accumulate(self, grads: Tensor) -> None:
        accumulate_block_gram(grads, self.block_size, out=self.store, fresh=self.fresh)
        self.fresh = False

    def finish(self, on_blocks: Callable[[int], None] | None = None) -> SymBlocks | Tensor:
        """H (n_b, B, B) of the samples added so far (consumes the builder's storage).

        ``on_blocks(n)`` is told of every ``n`` blocks inverted (progress)."""
        if self.count < 1:
            raise RuntimeError("no gradient samples were added to the Fisher")
        store, self.store = self.store, []  # released as soon as H exists
        if self.mspace:
            H = mspace_block_inverse(store, self.block_size, self.damp, packed=True)
            if on_blocks is not None:
                on_blocks(H.shape[0])
            return H
        last, self.last = self.last, None
        return invert_block_fisher(
            store, self.count, self.damp, on_blocks=on_blocks, last=last, fresh=self.fresh
        )


def block_fisher_inverse(
    grads: Tensor,
    block_size: int,
    damp: float,
    *,
    chunk_size: int = 128,
    mspace: bool | None = None,
    gram_dtype: torch.dtype = torch.float64,
) -> SymBlocks | Tensor:
    """H (n_b, B, B) of the damped empirical block Fisher of ``grads`` (m, d).

    `BlockFisherBuilder` fed in chunks of ``chunk_size`` rows: packed float64 `SymBlocks` from
    the m-space form when m < B, else from the float64 Gram (full ``gram_dtype`` blocks for
    ``gram_dtype=torch.float32``).
    """
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"grads must have shape (m, d) with m >= 1, got {tuple(grads.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    m, d = grads.shape
    builder = BlockFisherBuilder(
        d, block_size, m, damp, device=grads.device, dtype=work_dtype([grads.dtype]),
        gram_dtype=gram_dtype, mspace=mspace,
    )  # fmt: skip
    for s in range(0, m, chunk_size):
        builder.add(grads[s : s + chunk_size])
    return builder.finish()
