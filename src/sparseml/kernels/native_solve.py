"""Compiled CPU kernels (numba) that rebuild weights after a removal (see
`sparseml.kernels.native`):

* `replay_packed`: CAP's weights for any prefix of its elimination order, replayed from the
  per-step factors the compiled greedy (`sparseml.kernels.native_cap`) wrote over H's packed
  rows: O(B k) a block, the greedy's own operations and bits.
* `solve_subsets_packed`: y = (H_SS)^{-1} w_S and H y per block of packed H (LAPACK Cholesky,
  H_SS gathered from the triangle): OBS's joint update, and CAP's weights where H was kept.

The torch equivalents (`sparseml.kernels.cap_prefix.cap_reconstruct`, `sparseml.kernels.obs`)
remain the path on accelerators and the oracles of these kernels' tests.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sparseml.kernels.chunking import for_each_chunk
from sparseml.kernels.native import ENABLED, _c, single_threaded_blas

if ENABLED:
    from sparseml.kernels.native import _dpotrf, _dpotrs, _jit

    @_jit
    def _solve_subsets(w, data, sel, counts, blocks, y, hy, info):
        """For each block b in ``blocks``, with S = sel[b, :counts[b]]: y[b, S] = (H_SS)^{-1}
        w[b, S] (LAPACK Cholesky; y is left 0 elsewhere) and hy[b] = H y[b]. H is packed
        float64 (data), read where it lies: H_SS gathered from the triangle, H y by one pass
        over it. info[b] > 0 where H_SS is not positive definite (y[b], hy[b] are then left
        as they are)."""
        size = w.shape[1]
        m = np.empty((size, size))
        z, yb, tri = np.empty(size), np.empty(size), np.empty(size, np.int64)
        for i in range(size):
            tri[i] = i * (i + 1) // 2  # where row i of the triangle starts
        uplo = np.array([ord("U")], np.uint8)
        dims = np.array([0, 1, size], np.int32)  # n, nrhs, lda (m's row stride)
        status = np.zeros(1, np.int32)
        for b in blocks:
            k = counts[b]
            row = data[b]
            for i in range(k):
                si = sel[b, i]
                for j in range(i + 1):
                    sj = sel[b, j]
                    m[i, j] = row[tri[si] + sj] if sj <= si else row[tri[sj] + si]
                z[i] = w[b, si]
            dims[0] = k
            _dpotrf(uplo.ctypes.data, dims.ctypes.data, m.ctypes.data, dims[2:].ctypes.data,
                    status.ctypes.data)  # fmt: skip
            if status[0] == 0:
                _dpotrs(uplo.ctypes.data, dims.ctypes.data, dims[1:].ctypes.data, m.ctypes.data,
                        dims[2:].ctypes.data, z.ctypes.data, dims.ctypes.data,
                        status.ctypes.data)  # fmt: skip
            if status[0] == 0 and not np.isfinite(z[:k].sum()):  # LAPACK lets NaN through
                status[0] = 1
            if status[0] != 0:
                info[b] = max(status[0], 1)
                continue
            yb[:] = 0.0
            for j in range(k):
                yb[sel[b, j]] = z[j]
                y[b, sel[b, j]] = z[j]
            out = hy[b]
            for i in range(size):  # H y by rows of the triangle: H[i, :i] and H[:i, i]
                o, acc, yi = tri[i], 0.0, yb[i]
                for j in range(i):
                    acc += row[o + j] * yb[j]
                    out[j] += row[o + j] * yi
                out[i] = acc + row[o + i] * yi

    @_jit
    def _replay(weights, data, order, pre, counts, blocks, out):
        """For each block b of ``blocks`` whose packed row holds `_greedy_one`'s factors: the
        greedy's own weights after removing order[b, :counts[b]] (the pre-removed coordinates
        pre[b], which lead the order, then the first steps), replayed from the factors in
        O(B k) with the greedy's operations (the same bits), into out[b] (0 where removed)."""
        size = weights.shape[1]
        w, idx, pos = np.empty(size), np.empty(size, np.int64), np.empty(size, np.int64)
        for b in blocks:
            row, r = data[b], 0
            for j in range(size):
                if not pre[b, j]:
                    idx[r], pos[j], w[r] = j, r, weights[b, j]
                    r += 1
            first, o = size - r, 0
            for t in range(min(counts[b] - first, r)):
                p = pos[order[b, first + t]]
                dp, wp = row[o], w[p]
                for j in range(p):
                    u = row[o + 1 + j] / dp
                    w[j] -= u * wp
                for j in range(p + 1, r):
                    u = row[o + j] / dp
                    w[j] -= u * wp
                o += r
                last = r - 1  # the greedy's swap: the last remaining takes the pivot's place
                if p != last:
                    w[p], idx[p] = w[last], idx[last]
                    pos[idx[p]] = p
                r = last
            out[b, :] = 0.0
            for i in range(r):
                out[b, idx[i]] = w[i]


def replay_packed(W64: Tensor, H, order: Tensor, pre: Tensor, counts: Tensor, blocks: Tensor):
    """`_replay` of ``blocks`` (their packed rows of H hold the elimination's factors), spread
    over the intra-op threads: (n_b, B) float64 weights, zero on the rows not in ``blocks``."""
    out = torch.zeros_like(W64)
    args = (W64.contiguous().numpy(), H.data.numpy(), order.long().contiguous().numpy())
    args += (pre.contiguous().numpy(), counts.long().contiguous().numpy())
    todo = blocks.long().contiguous().numpy()
    _c(*args, todo, out.numpy())
    step = max(1, -(-len(todo) // (4 * torch.get_num_threads())))
    for_each_chunk(lambda i: _replay(*args, todo[i : i + step], out.numpy()), len(todo), step,
                   W64.device)  # fmt: skip
    return out


def solve_subsets_packed(w: Tensor, H, sel: Tensor, counts: Tensor, blocks: Tensor):
    """`_solve_subsets` of ``blocks`` for packed H (`SymBlocks`) on CPU, spread over the
    intra-op threads: returns y, H y (float64 (n_b, B)) and the per-block info (int32)."""
    w = w.to(torch.float64).contiguous()
    y, hy = torch.zeros_like(w), torch.zeros_like(w)
    info = torch.zeros(w.shape[0], dtype=torch.int32)
    fixed = (w.numpy(), H.data.contiguous().numpy(), sel.long().contiguous().numpy())
    fixed += (counts.long().contiguous().numpy(),)
    todo = blocks.long().contiguous().numpy()
    outs = (y.numpy(), hy.numpy(), info.numpy())
    _c(*fixed, todo, *outs)
    step = max(1, -(-len(todo) // (4 * torch.get_num_threads())))

    def batch(i: int) -> None:
        _solve_subsets(*fixed, todo[i : i + step], *outs)

    with single_threaded_blas():
        for_each_chunk(batch, len(todo), step, w.device)
    return y, hy, info
