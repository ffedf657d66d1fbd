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
from sparseml.kernels import native
from sparseml.kernels.chunking import chunk_blocks, for_each_chunk
from sparseml.kernels.packed import SymBlocks, pack

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
    fresh: bool = False,
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
        fresh: ``out`` (packed) holds nothing yet: the Grams are written into it, not added
            (its uninitialised memory is never read; spares a zero-filling pass).
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
    if c == 0:  # nothing to add (a fresh packed store still becomes zeros)
        if fresh and isinstance(out, SymBlocks):
            out.data.zero_()
        return out
    # Full blocks are a strided view of the chunk (no copy): (c, n_full, B) -> per block
    # X_b^T X_b with X_b = grads[:, b] (c, B). Only the short last block is padded (c x B copy).
    parts = [(0, grads[:, : n_full * block_size].view(c, n_full, block_size))]
    if n_full < n_b:
        parts.append((n_full, to_blocks(grads[:, n_full * block_size :], block_size)))
    if isinstance(out, SymBlocks):
        if _compiled_gram(grads, out):
            _accumulate_compiled(grads, out, c, blocks_per_chunk, fresh)
        else:
            if fresh:
                out.data.zero_()
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

    Slices are small (about 2 MiB of float64 products on CPU, so the product stays in cache
    while its triangle is added) and spread over the worker threads (`for_each_chunk`).
    """
    device = parts[0][1].device
    # 2 MiB of float64 products per slice on CPU: the fastest of 0.25-4 MiB at B = 192
    step = blocks_per_chunk or chunk_blocks(2 * bsz * max(bsz, c), device)
    for first, x in parts:

        def add(s: int, first=first, x=x) -> None:
            xs = x[:, s : s + step].permute(1, 0, 2)  # (n, c, B) view
            xs = torch.empty(xs.shape, dtype=torch.float64, device=device).copy_(xs)
            low = pack(torch.bmm(xs.transpose(1, 2), xs))
            out.data[first + s : first + s + xs.shape[0]] += low.to(out.device)

        for_each_chunk(add, x.shape[1], step, device)


def _compiled_gram(grads: Tensor, out: SymBlocks) -> bool:
    return (
        native.ENABLED
        and grads.device.type == out.device.type == "cpu"
        and grads.dtype in (torch.float32, torch.float64)
        and grads.stride(1) == 1  # rows may be slices of wider per-sample rows
        and grads.numel() > 0
        and out.data.is_contiguous()
    )


def _accumulate_compiled(grads: Tensor, out: SymBlocks, c: int, blocks_per_chunk, fresh) -> None:
    """`_accumulate_packed` in the compiled kernel: per block, the float64 upcast of its
    columns and a symmetric rank-c update (BLAS syrk: the lower triangle only, half the flops
    of a product) added into (``fresh``: written to) the packed row."""
    x, bsz = grads.numpy(), out.block
    step = blocks_per_chunk or chunk_blocks(2 * bsz * max(bsz, c), grads.device)

    def add(s: int) -> None:
        native.add_gram_packed(x, s, out.data[s : s + step].numpy(), bsz, fresh)

    with native.single_threaded_blas():
        for_each_chunk(add, out.shape[0], step, grads.device)


def invert_block_fisher(
    gram: Tensor,
    num_grads: int,
    damp: float,
    *,
    blocks_per_chunk: int | None = None,
    inplace: bool = True,
    on_blocks: Callable[[int], None] | None = None,
    last: Tensor | None = None,
    fresh: bool = False,
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
        last: a (c, d) chunk of samples not yet in ``gram`` (counted in ``num_grads``): added
            first, on the compiled path inside the inversion, where each Gram lies unpacked
            (one pass less over the packed rows). fresh: ``gram`` (packed) holds nothing yet,
            ``last`` is all there is.
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
    if last is not None and not inplace:
        raise ValueError("invert_block_fisher adds `last` to the Grams: it needs inplace=True")
    if last is not None and not (packed and _compiled_gram(last, gram)):
        gram = accumulate_block_gram(last, bsz, out=gram, fresh=fresh)
        last = None
    if packed:
        result = gram if inplace else SymBlocks(gram.data.clone(), bsz)
    else:
        result = gram if inplace else torch.empty_like(gram)
    step = blocks_per_chunk or chunk_blocks(bsz * bsz, gram.device)
    if gram.device.type == "cpu":  # at least one chunk per thread
        step = min(step, -(-n_b // torch.get_num_threads()))

    def invert_chunk(s: int) -> None:
        # A block's sum is finite iff its entries are (short of float64 overflow, itself a
        # fault): one pass, no chunk-sized boolean temporary.
        if compiled:
            rows = result.data[s : s + step]  # contiguous: ``compiled`` checked the storage
            x = None if last is None else last.numpy()
            info = native.invert_packed(rows.numpy(), bsz, num_grads, damp, x, s, fresh)
            info = torch.from_numpy(info)
            _check_finite(info < 0, s)  # the kernel marks NaN/Inf Grams with -1
            _check_factorized(info, s, n_b, bsz, damp)
            if on_blocks is not None:
                on_blocks(rows.shape[0])
            return
        if packed:  # the lower triangles, all that Cholesky reads (the rest stays unset)
            sums = gram.data[s : s + step].sum(dim=1)
            buf = torch.empty((step, bsz, bsz), dtype=torch.float64, device=gram.device)
            f = gram.rows(s, step, out=buf, lower_only=True)
        else:
            f = gram[s : s + step]
            if not (inplace and f.dtype == torch.float64):  # else factorised where it lies
                f = f.to(torch.float64, copy=True)
            sums = f.sum(dim=(1, 2))
        _check_finite(~torch.isfinite(sums), s)
        f.div_(num_grads).diagonal(dim1=-2, dim2=-1).add_(damp)
        info = torch.empty(f.shape[0], dtype=torch.int32, device=f.device)
        if packed:  # a fresh factor is faster than factorising in place (measured)
            f, info = torch.linalg.cholesky_ex(f)
        else:  # out= aliasing the input: two float64 buffers per chunk, not three
            torch.linalg.cholesky_ex(f, out=(f, info))
        _check_factorized(info, s, n_b, bsz, damp)
        if packed:
            result.write(s, torch.cholesky_inverse(f))
        else:
            torch.cholesky_inverse(f, out=f)
            if f.data_ptr() != result[s : s + step].data_ptr():
                result[s : s + step] = f
        if on_blocks is not None:
            on_blocks(f.shape[0])

    compiled = packed and native.ENABLED and gram.device.type == "cpu"
    compiled = compiled and result.data.is_contiguous()
    if compiled:
        with native.single_threaded_blas():
            for_each_chunk(invert_chunk, n_b, step, gram.device)
    else:
        for_each_chunk(invert_chunk, n_b, step, gram.device)
    return result


def _check_finite(bad: Tensor, start: int) -> None:
    """Raise for the first block (from ``start``) marked ``bad`` (its Gram holds NaN/Inf)."""
    if bad.any():
        raise NumericalError(
            f"Fisher block {start + int(bad.nonzero()[0])} has NaN/Inf Gram entries: check the "
            "loss and gradients (a larger damp cannot fix this)"
        )


def _check_factorized(info: Tensor, start: int, n_b: int, bsz: int, damp: float) -> None:
    """Raise for the first block (from ``start``) whose Cholesky factorization failed."""
    failed = info.nonzero()
    if failed.numel():
        b = int(failed[0])
        raise NumericalError(
            f"Fisher block {start + b} (of {n_b}, block size {bsz}) is not positive definite: "
            f"Cholesky failed at leading minor {int(info[b])} with damp={damp:g}; "
            f"use a larger damp (e.g. {damp * 10:g}) or a float64 Gram"
        )


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
