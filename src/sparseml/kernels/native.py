"""Compiled CPU kernels (numba) for the hot loops of second-order pruning: the loader and the
block Fisher's kernels here, CAP's and OBS's in `sparseml.kernels.native_cap`, FastCAP's sweep
steps in `sparseml.kernels.native_fast_cap`.

* `add_gram_packed`: a chunk's Grams added into packed float64 triangles, per block a float64
  copy of its columns and a symmetric rank-c update (BLAS syrk: the triangle only).
* `invert_packed`: H_b = (damp I + S_b / m)^{-1} of packed Grams, in place, block by block:
  unpack into a B x B scratch, LAPACK ``dpotrf``, the factor's inverse by bottom-up halving
  (BLAS ``dtrmm``), LAPACK ``dlauum``, repack. A packed triangle
  (row-major lower, `sparseml.kernels.packed`) is LAPACK's column-major upper triangle, so the
  factorization reads exactly the unpacked rows.

BLAS/LAPACK are scipy's, bound by symbol (so numba can cache the compiled code) and called
without the GIL; every kernel works one block at a time, and callers spread batches over
threads (`sparseml.kernels.chunking.for_each_chunk`) inside `single_threaded_blas`. Their
torch equivalents (`sparseml.kernels.fisher`, `sparseml.kernels.cap`, ...) remain the path on
accelerators, without numba, and the oracles of these kernels' tests. ``ENABLED`` is False
when numba or scipy's LAPACK cannot be loaded or ``SPARSEML_NATIVE=0``; tests switch it off
to compare the two paths.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

try:  # numba and scipy are requirements; a bare environment still runs the torch kernels
    import llvmlite.binding
    import numba
    from numba.extending import get_cython_function_address
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

ENABLED = numba is not None and os.environ.get("SPARSEML_NATIVE", "1") != "0"


def _routine(module: str, name: str, nargs: int):
    """scipy's BLAS/LAPACK routine ``name`` as a numba external function (Fortran ABI: every
    argument by pointer). Bound by symbol, not by address, so compiled code can be cached."""
    symbol = f"sparseml_{name}"
    llvmlite.binding.add_symbol(symbol, get_cython_function_address(module, name))
    return numba.types.ExternalFunction(symbol, numba.types.void(*[numba.types.voidptr] * nargs))


if ENABLED:
    try:
        _dpotrf = _routine("scipy.linalg.cython_lapack", "dpotrf", 5)
        _dlauum = _routine("scipy.linalg.cython_lapack", "dlauum", 5)
        _dpotrs = _routine("scipy.linalg.cython_lapack", "dpotrs", 8)
        _dsyrk = _routine("scipy.linalg.cython_blas", "dsyrk", 10)
        _dtrmm = _routine("scipy.linalg.cython_blas", "dtrmm", 11)
    except (ImportError, ValueError, AttributeError):  # pragma: no cover - scipy without LAPACK
        ENABLED = False

if ENABLED:
    _jit = numba.njit(nogil=True, cache=True)

    @_jit
    def _block_columns(x, lo, xs):
        """xs (c, B) = float64 x[:, lo : lo + B], zero past x's columns."""
        c, d = x.shape
        width = min(xs.shape[1], d - lo)
        for i in range(c):
            for j in range(width):
                xs[i, j] = x[i, lo + j]
            for j in range(width, xs.shape[1]):
                xs[i, j] = 0.0

    @_jit
    def _syrk_lower(xs, a, beta, dims, scalars, text):
        """The lower triangle of a (B x B, row-major) = X^T X + beta * itself, X = xs (c, B):
        BLAS syrk, for which a is column-major upper and xs^T is B x c (lda B)."""
        scalars[1] = beta
        dims[0], dims[1] = xs.shape[1], xs.shape[0]
        _dsyrk(text.ctypes.data, text[1:].ctypes.data, dims.ctypes.data, dims[1:].ctypes.data,
               scalars.ctypes.data, xs.ctypes.data, dims.ctypes.data, scalars[1:].ctypes.data,
               a.ctypes.data, dims.ctypes.data)  # fmt: skip

    @_jit
    def _add_gram_packed(x, first, out, block, assign):
        """out[first + b] += the lower triangle of X_b^T X_b, for X_b = x[:, b B : (b + 1) B]
        (zero-padded past x's columns) and every row b of out (n, B (B + 1) / 2); x (c, d).
        ``assign``: out's rows are written (their old contents are never read)."""
        xs = np.zeros((x.shape[0], block))
        prod = np.empty((block, block))
        text = np.array([ord("U"), ord("N")], np.uint8)
        dims, scalars = np.zeros(2, np.int32), np.array([1.0, 0.0])
        for b in range(out.shape[0]):
            _block_columns(x, (first + b) * block, xs)
            _syrk_lower(xs, prod, 0.0, dims, scalars, text)
            if assign:
                _pack_lower(prod, out[b])
            else:
                _add_lower(prod, out[b])

    # Triangles up to this order are inverted by the plain loop of `_tri_inv_base`; larger
    # ones are split in two (BLAS trmm): LAPACK's dtrtri is the slowest part of a B = 192
    # inversion (half of it, at a third of its rate), the split one a third faster in all.
    _TRI_BASE = 24

    @_jit
    def _tri_inv_base(a, k0, k1, acc):
        """Invert in place the upper triangular U[k0:k1, k0:k1] (column-major; U[i, j] is
        a[j, i]), column by column: X[:j, j] = -X[:j, :j] U[:j, j] / U[j, j], summed over the
        (contiguous) columns of X."""
        for j in range(k0, k1):
            acc[: j - k0] = 0.0
            for c in range(k0, j):
                t = a[j, c]
                for i in range(c - k0 + 1):
                    acc[i] += a[c, k0 + i] * t
            a[j, j] = 1.0 / a[j, j]
            scale = -a[j, j]
            for i in range(j - k0):
                a[j, k0 + i] = acc[i] * scale

    @_jit
    def _tri_inv(a, acc, text, dims, scalars):
        """U^-1 in place for the upper triangular U (column-major, in a), bottom-up (numba's
        cache does not hold recursive functions): the diagonal triangles of `_TRI_BASE` by
        the plain loop, then neighbours of width w merged for w = base, 2 base, ...: with
        U = [U11 U12; 0 U22] and both inverted, the inverse is [X11, -X11 U12 X22; 0, X22]
        (two BLAS trmm on U12)."""
        n = a.shape[0]
        for k0 in range(0, n, _TRI_BASE):
            _tri_inv_base(a, k0, min(n, k0 + _TRI_BASE), acc)
        base, t = a.ctypes.data, text.ctypes.data  # "ULNR": upper; left; no transpose,
        width = _TRI_BASE  # non-unit; right
        while width < n:
            for k0 in range(0, n - width, 2 * width):
                mid, k1 = k0 + width, min(n, k0 + 2 * width)
                dims[0], dims[1], dims[2] = width, k1 - mid, n
                x11, x22 = base + 8 * (k0 * n + k0), base + 8 * (mid * n + mid)
                u12 = base + 8 * (mid * n + k0)
                # U12 <- -X11 U12, then U12 <- U12 X22
                _dtrmm(t + 1, t, t + 2, t + 2, dims.ctypes.data, dims[1:].ctypes.data,
                       scalars[1:].ctypes.data, x11, dims[2:].ctypes.data, u12,
                       dims[2:].ctypes.data)  # fmt: skip
                _dtrmm(t + 3, t, t + 2, t + 2, dims.ctypes.data, dims[1:].ctypes.data,
                       scalars.ctypes.data, x22, dims[2:].ctypes.data, u12,
                       dims[2:].ctypes.data)  # fmt: skip
            width *= 2

    @_jit
    def _invert_lower(a, count, damp, ws, text, dims, scalars, status):
        """a's lower triangle S (row-major B x B) -> (damp I + S / count)^-1 in place: LAPACK
        dpotrf (F = U^T U, column-major upper), U^-1 (`_tri_inv`), then dlauum (U^-1 U^-T =
        F^-1). Returns dpotrf's info (> 0: not positive definite at that leading minor)."""
        block = a.shape[0]
        for i in range(block):
            for j in range(i + 1):
                a[i, j] /= count
            a[i, i] += damp
        order = dims[3:]
        order[0] = block
        _dpotrf(text.ctypes.data, order.ctypes.data, a.ctypes.data, order.ctypes.data,
                status.ctypes.data)  # fmt: skip
        if status[0] != 0:
            return status[0]
        _tri_inv(a, ws, text, dims, scalars)
        _dlauum(text.ctypes.data, order.ctypes.data, a.ctypes.data, order.ctypes.data,
                status.ctypes.data)  # fmt: skip
        return 0

    @_jit
    def _pack_lower(a, row):
        o = 0
        for i in range(a.shape[0]):
            for j in range(i + 1):
                row[o + j] = a[i, j]
            o += i + 1

    @_jit
    def _add_lower(a, row):
        o = 0
        for i in range(a.shape[0]):
            for j in range(i + 1):
                row[o + j] += a[i, j]
            o += i + 1

    @_jit
    def _invert_packed(data, block, count, damp, info, x, first, fresh):
        """data (n, B (B + 1) / 2) float64 packed Grams S -> packed (damp I + S / count)^-1, in
        place; info[b] > 0 at the leading minor where block b's factorization failed, -1 where
        its Gram holds NaN/Inf (its row is then undefined). A non-empty chunk x (c, d) (its
        blocks first, first + 1, ...) is first added to each Gram where it lies unpacked, so
        the last chunk of samples never makes a pass of its own over the packed rows;
        ``fresh``: the rows hold nothing yet (x is the only chunk)."""
        a = np.zeros((block, block))
        xs = np.zeros((x.shape[0], block))
        ws = np.empty(block)
        text = np.array([ord("U"), ord("L"), ord("N"), ord("R")], np.uint8)
        syrk_text = np.array([ord("U"), ord("N")], np.uint8)
        dims, scalars = np.zeros(4, np.int32), np.array([1.0, -1.0])
        syrk_dims, syrk_scalars = np.zeros(2, np.int32), np.array([1.0, 0.0])
        status = np.zeros(1, np.int32)
        for b in range(data.shape[0]):
            row = data[b]
            o = 0
            total = 0.0
            for i in range(block):
                for j in range(i + 1):
                    a[i, j] = 0.0 if fresh else row[o + j]
                o += i + 1
            if x.shape[0]:
                _block_columns(x, (first + b) * block, xs)
                _syrk_lower(xs, a, 1.0, syrk_dims, syrk_scalars, syrk_text)
            for i in range(block):
                for j in range(i + 1):
                    total += a[i, j]
            if not np.isfinite(total):
                info[b] = -1
                continue
            info[b] = _invert_lower(a, count, damp, ws, text, dims, scalars, status)
            if info[b] == 0:
                _pack_lower(a, row)


def _c(*arrays) -> None:
    """One compiled signature per kernel: every array C-contiguous and writable."""
    for a in arrays:
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise ValueError("native kernels take C-contiguous writable arrays")


def add_gram_packed(
    x: np.ndarray, first: int, out: np.ndarray, block: int, assign: bool = False
) -> None:
    """Add the chunk x (c, d)'s Grams to packed float64 rows out = blocks first, first + 1, ...
    (``assign``: write them, the rows' contents are not read) (`_add_gram_packed`; inside
    `single_threaded_blas` when several threads run it)."""
    if x.strides[1] != x.itemsize:
        raise ValueError("add_gram_packed needs unit-stride rows")
    _c(out)
    _add_gram_packed(x, int(first), out, int(block), bool(assign))


def invert_packed(
    data: np.ndarray,
    block: int,
    count: int,
    damp: float,
    last: np.ndarray | None = None,
    first: int = 0,
    fresh: bool = False,
) -> np.ndarray:
    """Invert packed float64 Grams in place, after adding the chunk ``last`` (c, d) to them
    (blocks first, first + 1, ...; ``fresh``: the rows hold nothing yet) (`_invert_packed`);
    returns the per-block info (-1: NaN/Inf in the Gram).

    Call inside `single_threaded_blas` when several threads run it."""
    _c(data)
    if last is None:
        last = np.zeros((0, 1), np.float32)
    elif last.strides[1] != last.itemsize:
        raise ValueError("invert_packed needs unit-stride rows")
    info = np.zeros(data.shape[0], np.int32)
    _invert_packed(data, block, float(count), float(damp), info, last, int(first), bool(fresh))
    return info


_warm: list[bool] = []  # warm_up has run in this process


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # scans the loaded libraries once (scipy's are loaded)


def single_threaded_blas():
    """Context in which scipy's BLAS/LAPACK runs on the calling thread only (the callers
    already run one batch per core; a threaded LAPACK under them oversubscribes)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def warm_up() -> None:
    """Load (on the first run after an install: compile, a few seconds) every compiled kernel
    by running it on a tiny problem. A fixed per-process cost (~0.3 s and some tens of MB of
    JIT code when loaded from numba's cache), otherwise paid by the first call of each; the
    pruners that collect gradients call this before their timed phases, and the memory probes
    and benchmarks before they measure, so their figures show only what scales."""
    if not ENABLED or _warm:
        return
    from sparseml.kernels.cap import cap_eliminate, cap_nm_prune, cap_reconstruct
    from sparseml.kernels.fisher_build import block_fisher_inverse
    from sparseml.kernels.native_fast_cap import warm_up as fast_cap_warm_up
    from sparseml.kernels.obs import obs_prune_update

    # CPU tensors whatever torch's default device; the global RNG stays as the run left it
    g, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    H = block_fisher_inverse(torch.randn(8, 16, generator=g, device=cpu), 4, 1.0, chunk_size=4)
    W = torch.randn(4, 4, generator=g, device=cpu)
    none = torch.zeros(4, 4, dtype=torch.bool, device=cpu)
    order, _ = cap_eliminate(W, H, none)  # the packed greedy
    cap_eliminate(W, H.full(), none)  # the greedy on [H | w] batches
    cap_nm_prune(W, H, none, 2, 4)
    cap_reconstruct(W, H, order, torch.full((4,), 2, device=cpu))
    obs_prune_update(W.flatten(), H, torch.rand(16, generator=g, device=cpu) < 0.5)
    fast_cap_warm_up()
    _warm.append(True)
