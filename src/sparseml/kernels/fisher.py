"""Block-diagonal empirical Fisher inverses, built with batched GEMMs and batched Cholesky.

The damped empirical Fisher of a layer, restricted to its diagonal blocks, is

    F_b = damp * I_B + (1/m) * sum_i g_b^(i) g_b^(i)^T,      H_b = F_b^{-1},

where g^(i) (d,) are the m (masked) gradient samples of the layer and g_b their coordinates
[b*B, (b+1)*B) in the row-major flattening of the weight.

Block layout rule (shared by every caller):
- A layer's weight is handled as its row-major flattening w (d,). Block b holds the B consecutive
  coordinates [b*B, (b+1)*B); there are n_b = ceil(d / B) blocks.
- The last block is zero-padded to B. Padded coordinates get zero gradient, so their rows and
  columns of F_b are damp * e_p and those of H_b are e_p / damp: they are decoupled from the real
  coordinates, which makes a padded block exactly equivalent to a shorter one. Pruned coordinates
  (masked gradients, hence zero) are decoupled the same way.
- Grouped patterns (block4, N:M) use groups of g consecutive coordinates; callers guarantee
  B % g == 0, so a group never straddles two blocks.

Instead of the reference's m rank-1 Sherman-Morrison updates (memory-bound BLAS-2), the Gram
matrices S_b = sum_i g_b g_b^T are accumulated chunk by chunk with batched float64 GEMMs, and
each F_b is inverted once with a float64 Cholesky factorization. Both give F_b^{-1}; only
rounding differs. When m < B, `mspace_block_inverse` applies Woodbury in the m-dimensional
sample space instead, which never forms the (rank-deficient) B x B Gram and is accurate for any
damp.

Precision and memory: every sum and factorization runs in float64 (a float32 Gram loses the
directions of F_b below eps_32 ||S_b|| / m, which damps like CAP's 1e-8 need), and what is kept
between steps, first the Gram and then H, is stored as float64 lower triangles
(`sparseml.kernels.packed.SymBlocks`): (B + 1) / B times the memory of float32 blocks, with no
rounding to float32 anywhere. H is inverted in place, a few blocks at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sparseml.errors import NumericalError
from sparseml.kernels.chunking import chunk_blocks, for_each_chunk
from sparseml.kernels.packed import SymBlocks, pack, packed_numel
from sparseml.kernels.precision import work_dtype

# Gradient entries upcast at a time when a float32 chunk feeds a float64 Gram.
UPCAST_NUMEL = 2**22


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"fisher block_size must be an integer >= 1, got {block_size!r}")


def _check_num_grads_damp(num_grads: int, damp: float) -> None:
    if isinstance(num_grads, bool) or not isinstance(num_grads, int) or num_grads < 1:
        raise ValueError(f"num_grads must be an integer >= 1, got {num_grads!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a finite number > 0, got {damp!r}")


def num_blocks(d: int, block_size: int) -> int:
    """Number of Fisher blocks ceil(d / block_size) of a flattened weight of d coordinates."""
    _check_block_size(block_size)
    return math.ceil(d / block_size)


def to_blocks(x: Tensor, block_size: int) -> Tensor:
    """View ``x`` (..., d) as (..., n_b, B), zero-padding the last block (a copy only then)."""
    d = x.shape[-1]
    pad = num_blocks(d, block_size) * block_size - d
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block_size)


def from_blocks(xb: Tensor, d: int) -> Tensor:
    """Inverse of `to_blocks`: (..., n_b, B) -> (..., d), dropping the padding."""
    return xb.reshape(*xb.shape[:-2], -1)[..., :d]


def accumulate_block_gram(
    grads: Tensor,
    block_size: int,
    out: Tensor | None = None,
    *,
    blocks_per_chunk: int | None = None,
) -> Tensor:
    """Add sum_i g_b^(i) g_b^(i)^T over a chunk of gradients to every block's Gram matrix.

    Args:
        grads: (c, d) chunk of c flattened gradient samples.
        block_size: B.
        out: (n_b, B, B) float Gram accumulator, updated in place; the GEMMs run in its dtype
            (float64 for an accurate Fisher at small damp, see `invert_block_fisher`). If None,
            float32 zeros are allocated on ``grads.device``. It may live on another device
            than ``grads`` (the ``fisher_inv_device``): the GEMMs then run on
            ``grads.device`` over slices of ``blocks_per_chunk`` blocks and each slice is
            added into ``out``.
    Returns:
        ``out`` (n_b, B, B).
    """
    _check_block_size(block_size)
    if grads.dim() != 2:
        raise ValueError(f"grads must have shape (c, d), got {tuple(grads.shape)}")
    c, d = grads.shape
    n_b, n_full = num_blocks(d, block_size), d // block_size
    if out is None:
        out = torch.zeros(n_b, block_size, block_size, dtype=torch.float32, device=grads.device)
    elif tuple(out.shape) != (n_b, block_size, block_size):
        raise ValueError(
            f"out must have shape {(n_b, block_size, block_size)} for d={d}, "
            f"block_size={block_size}, got {tuple(out.shape)}"
        )
    # Full blocks are a strided view of the chunk (no copy): (c, n_full, B) -> per block
    # X_b^T X_b with X_b = grads[:, b] (c, B). Only the short last block is padded (c x B copy).
    parts = [(0, grads[:, : n_full * block_size].view(c, n_full, block_size))]
    if n_full < n_b:
        parts.append((n_full, to_blocks(grads[:, n_full * block_size :], block_size)))
    if isinstance(out, SymBlocks):
        _accumulate_packed(parts, out, c, block_size, blocks_per_chunk)
        return out
    same_device = out.device == grads.device
    upcast = grads.dtype != out.dtype
    if blocks_per_chunk:
        step = blocks_per_chunk
    elif same_device and not upcast:
        step = n_b
    elif same_device:  # upcast slices of at most UPCAST_NUMEL entries (32 MiB of float64)
        step = max(1, UPCAST_NUMEL // (c * block_size))
    else:  # bound the transferred slice (a few MiB), not the whole chunk
        step = chunk_blocks(block_size * max(block_size, c), grads.device)
    for first, x in parts:
        for s in range(0, x.shape[1], step):
            xs = x[:, s : s + step].permute(1, 0, 2)  # (n, c, B) view
            if upcast:  # one contiguous copy in the batch layout the GEMM wants
                xs = torch.empty(xs.shape, dtype=out.dtype, device=xs.device).copy_(xs)
            target = out[first + s : first + s + xs.shape[0]]
            if same_device:
                target.baddbmm_(xs.transpose(1, 2), xs)
            else:
                target += torch.bmm(xs.transpose(1, 2), xs).to(out.device)
    return out


def _accumulate_packed(parts, out: SymBlocks, c: int, bsz: int, blocks_per_chunk) -> None:
    """Add X_b^T X_b to the packed float64 Grams: per slice of blocks one float64 bmm on an
    upcast copy of the slice (exact products, float64 sums), then its lower triangles.

    Slices are small (about 4 MiB of float64 products on CPU, so the product stays in cache
    while its triangle is added) and spread over the worker threads (`for_each_chunk`).
    """
    device = parts[0][1].device
    step = blocks_per_chunk or chunk_blocks(bsz * max(bsz, c), device)
    for first, x in parts:

        def add(s: int, first=first, x=x) -> None:
            xs = x[:, s : s + step].permute(1, 0, 2)  # (n, c, B) view
            xs = torch.empty(xs.shape, dtype=torch.float64, device=device).copy_(xs)
            low = pack(torch.bmm(xs.transpose(1, 2), xs))
            out.data[first + s : first + s + xs.shape[0]] += low.to(out.device)

        for_each_chunk(add, x.shape[1], step, device)


def invert_block_fisher(
    gram: Tensor,
    num_grads: int,
    damp: float,
    *,
    blocks_per_chunk: int | None = None,
    inplace: bool = True,
    on_blocks: Callable[[int], None] | None = None,
) -> Tensor:
    """H_b = (damp * I + gram_b / num_grads)^{-1} for every block, via float64 Cholesky.

    Args:
        gram: (n_b, B, B) Gram matrices sum_i g_b g_b^T (from `accumulate_block_gram`), a
            tensor or packed float64 `SymBlocks` (then H is packed too).
        num_grads: m, the number of gradients actually accumulated (the normalisation).
        damp: absolute damping lambda > 0.
        blocks_per_chunk: blocks factorised per float64 batch (bounds the extra memory to a few
            such batches per thread); default about 4 MiB of float64 per batch on CPU.
        inplace: write H into ``gram``'s storage (no second (n_b, B, B) tensor; a float64
            Gram is factorised where it lies, so after a `NumericalError` it holds garbage).
        on_blocks: told ``n`` after every chunk of ``n`` blocks is inverted (progress; may be
            called from worker threads).
    Returns:
        (n_b, B, B) H in ``gram``'s dtype and device.
    Raises:
        NumericalError: non-finite Gram entries, or a block that is not positive definite.

    Precision: a float32 Gram is exact only to about eps_32 * ||gram_b / m||, so directions of F_b
    with eigenvalue below that are lost when damp is smaller, H is off by ~eps_32 ||gram_b|| /
    (m damp) relative (15% at damp = 1.4e-7 ||gram_b / m||), and the Gram may even be
    indefinite. Production accumulates in float64 (relative error ~1e-6 down to damp ~1e-10
    ||gram_b / m||); `mspace_block_inverse` is exact for any damp when m < B.
    """
    _check_num_grads_damp(num_grads, damp)
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must have shape (n_b, B, B), got {tuple(gram.shape)}")
    _check_block_size(gram.shape[1])
    n_b, bsz = gram.shape[0], gram.shape[1]
    packed = isinstance(gram, SymBlocks)
    if packed:
        result = gram if inplace else SymBlocks(gram.data.clone(), bsz)
    else:
        result = gram if inplace else torch.empty_like(gram)
    step = blocks_per_chunk or chunk_blocks(bsz * bsz, gram.device)
    if gram.device.type == "cpu":  # at least one chunk per thread
        step = min(step, -(-n_b // torch.get_num_threads()))

    def invert_chunk(s: int) -> None:
        f = gram[s : s + step]  # packed: unpacked into a float64 copy
        if not (packed or (inplace and f.dtype == torch.float64)):  # else factorised in place
            f = f.to(torch.float64, copy=True)
        # A block's sum is finite iff its entries are (short of float64 overflow, itself a
        # fault): one pass, no chunk-sized boolean temporary.
        bad = ~torch.isfinite(f.sum(dim=(1, 2)))
        if bad.any():
            raise NumericalError(
                f"Fisher block {s + int(bad.nonzero()[0])} has NaN/Inf Gram entries: check the "
                "loss and gradients (a larger damp cannot fix this)"
            )
        f.div_(num_grads).diagonal(dim1=-2, dim2=-1).add_(damp)
        # out= aliasing the input keeps the peak at two float64 buffers per chunk, not three.
        info = torch.empty(f.shape[0], dtype=torch.int32, device=f.device)
        torch.linalg.cholesky_ex(f, out=(f, info))
        failed = info.nonzero()
        if failed.numel():
            b = int(failed[0])
            raise NumericalError(
                f"Fisher block {s + b} (of {n_b}, block size {bsz}) is not positive definite: "
                f"Cholesky failed at leading minor {int(info[b])} with damp={damp:g}; "
                f"use a larger damp (e.g. {damp * 10:g}) or a float64 Gram"
            )
        torch.cholesky_inverse(f, out=f)
        if packed:
            result.write(s, f)
        elif f.data_ptr() != result[s : s + step].data_ptr():
            result[s : s + step] = f
        if on_blocks is not None:
            on_blocks(f.shape[0])

    for_each_chunk(invert_chunk, n_b, step, gram.device)
    return result


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
    be added; the normalisation uses the number actually added.

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
        if self.mspace:
            self.store: Tensor | SymBlocks | list[Tensor] = []
        elif gram_dtype == torch.float64:
            self.store = SymBlocks.zeros(n_b, block_size, device)
        else:
            shape = (n_b, block_size, block_size)
            self.store = torch.zeros(shape, device=device, dtype=gram_dtype)

    def add(self, grads: Tensor) -> None:
        """Add a (c, d) chunk of samples."""
        if grads.dim() != 2 or grads.shape[1] != self.d:
            raise ValueError(f"grads must have shape (c, {self.d}), got {tuple(grads.shape)}")
        c = grads.shape[0]
        if self.mspace:
            if self.count + c > self.num_grads:
                raise RuntimeError(f"more than num_grads={self.num_grads} samples added")
            # Keep a view only when it does not pin a much larger tensor (another rank's part)
            # and needs no conversion; otherwise a compact copy.
            base = grads if grads._base is None else grads._base
            shared = grads.numel() * 2 < base.numel()
            kept = grads.to(self.device, self.dtype)
            self.store.append(kept.clone() if kept is grads and shared else kept)
        else:
            accumulate_block_gram(grads, self.block_size, out=self.store)
        self.count += c

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
        return invert_block_fisher(store, self.count, self.damp, on_blocks=on_blocks)


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


def block_diag(H: Tensor | SymBlocks, d: int) -> Tensor:
    """The diagonal of the block-diagonal H (n_b, B, B) as a (d,) vector."""
    return from_blocks(H.diagonal(dim1=-2, dim2=-1), d)


def block_matvec(H: Tensor | SymBlocks, v: Tensor) -> Tensor:
    """H v for H (n_b, B, B) and v (d,); the result is (d,), on H's device and dtype."""
    vb = to_blocks(v.to(device=H.device, dtype=H.dtype), H.shape[-1]).unsqueeze(-1)
    if not isinstance(H, SymBlocks):
        return from_blocks(torch.bmm(H, vb).squeeze(-1), v.shape[-1])
    out = torch.empty(vb.shape[:2], dtype=H.dtype, device=H.device)
    step = chunk_blocks(H.shape[1] * H.shape[1], H.device)
    for s in range(0, H.shape[0], step):  # a few unpacked blocks at a time
        out[s : s + step] = torch.bmm(H[s : s + step], vb[s : s + step]).squeeze(-1)
    return from_blocks(out, v.shape[-1])
