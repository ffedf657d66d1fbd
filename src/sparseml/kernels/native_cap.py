"""Compiled CPU kernels (numba) of CAP and OBS on packed H (see `sparseml.kernels.native`).

* `greedy_packed` / `greedy_blocks`: CAP's greedy OBS elimination of each block in a compact
  copy of the lower triangle of its remaining [H | w], its rank-1 Schur downdates applied
  `_LAZY` at a time by BLAS syrk (B^3 / 3 multiply-adds a block, no per-step op dispatch); a
  removed coordinate's row and column are replaced by the last remaining ones, so the active
  part stays a leading square. It can leave its per-step factors in H's packed rows, from
  which `sparseml.kernels.native_solve.replay_packed` rebuilds the weights.
* CAP's replayed weights and OBS's subset solves: `sparseml.kernels.native_solve`.

The torch equivalents (`sparseml.kernels.cap_greedy._greedy`, `cap_prefix`, `obs`) remain the path on
accelerators and the second oracle of these kernels' tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparseml.errors import NumericalError
from sparseml.kernels.native import ENABLED, _c

# The greedy's eager rank-1 downdates stream its r x r block once per step: up to this size
# (8 MiB) it stays in cache and beats the blocked torch greedy (timed on one core); larger
# blocks fall out of cache and use the blocked (GEMM) path.
GREEDY_MAX_BLOCK = 1024
# Downdates the compiled greedy lets wait before one BLAS syrk applies them (`_greedy_one`).
_LAZY = 16

if ENABLED:
    import numba

    from sparseml.kernels.native import _dsyrk, _jit

    @_jit
    def _greedy_one(h, w, idx, r, lo, steps, group, cnt, n, piv, hist, out, rp, fac, ws):
        """CAP's greedy on one block held compactly: the lower triangle of h[:r, :r] and w[:r]
        are the remaining coordinates idx[:r] (ascending) of [H | w]. Pivot: argmin w_j^2 /
        max(H_jj, lo) over the open coordinates (lowest index on ties; with ``group`` > 0, a
        group of that size with cnt[g] >= n removed is closed); then w -= (w_p / H_pp) H[:, p]
        and the Schur downdate H -= H[:, p] H[p, :] / H_pp, and the last remaining coordinate
        takes the pivot's place. Writes piv (T,) original indices (-1 after the last step),
        hist (T,) the pivots' scores (0 after), out (B,) the final weights (0 where removed);
        updates cnt. A non-empty ``fac`` receives every step's factor for `_replay`: its pivot
        H_pp (floored) then the pivot's column at the r - 1 other remaining positions, r
        entries per step.

        The downdates are lazy: up to `_LAZY` of them wait as the columns v_s = H[:, p_s] /
        sqrt(H_pp) (rows of ws[1:]) and are applied to the triangle at once by BLAS syrk
        (h -= V V^T); a step rebuilds only its pivot's column from them, while the diagonal
        (ws[0]) and w are downdated at every step."""
        d, v = ws[0], ws[1:]
        size, lazy = h.shape[0], ws.shape[0] - 1
        text = np.array([ord("U"), ord("N")], np.uint8)
        dims = np.array([0, 0, size], np.int32)  # n, k, leading dimension
        scalars = np.array([-1.0, 1.0])
        for j in range(r):
            d[j] = h[j, j]
        o, k = 0, 0
        for t in range(piv.shape[0]):
            if t >= steps:
                piv[t] = -1
                hist[t] = 0.0
                continue
            best, p = math.inf, -1
            for j in range(r):
                if group and cnt[idx[j] // group] >= n:
                    continue
                dj = max(d[j], lo)
                s = w[j] * w[j] / dj
                if p < 0 or s < best or (s == best and idx[j] < idx[p]):
                    best, p = s, j
            if p < 0:  # no open coordinate left (callers' step counts never ask for this)
                piv[t:] = -1
                hist[t:] = 0.0
                break
            piv[t] = idx[p]
            hist[t] = best
            dp = max(d[p], lo)
            wp = w[p]
            for j in range(p + 1):  # column p of the symmetric block, less what is pending
                rp[j] = h[p, j]
            for j in range(p + 1, r):
                rp[j] = h[j, p]
            for q in range(k):
                vp = v[q, p]
                for j in range(r):
                    rp[j] -= v[q, j] * vp
            if fac.shape[0]:
                fac[o] = dp
                for j in range(p):
                    fac[o + 1 + j] = rp[j]
                for j in range(p + 1, r):
                    fac[o + j] = rp[j]
                o += r
            root = math.sqrt(dp)
            for i in range(r):
                u = rp[i] / dp
                w[i] -= u * wp
                d[i] -= u * rp[i]
                v[k, i] = rp[i] / root
            k += 1
            if group:
                cnt[idx[p] // group] += 1
            last = r - 1  # the last remaining coordinate takes the pivot's place
            if p != last:
                for j in range(p):
                    h[p, j] = h[last, j]
                h[p, p] = h[last, last]
                for i in range(p + 1, last):
                    h[i, p] = h[last, i]
                w[p], idx[p], d[p] = w[last], idx[last], d[last]
                for q in range(k):
                    v[q, p] = v[q, last]
            r = last
            if k == lazy and r > 0:  # column-major: h is the upper triangle, V^T is r x k
                dims[0], dims[1] = r, k
                _dsyrk(text.ctypes.data, text[1:].ctypes.data, dims.ctypes.data,
                       dims[1:].ctypes.data, scalars.ctypes.data, v.ctypes.data,
                       dims[2:].ctypes.data, scalars[1:].ctypes.data, h.ctypes.data,
                       dims[2:].ctypes.data)  # fmt: skip
                k = 0
        out[:] = 0.0
        for i in range(r):
            out[idx[i]] = w[i]

    @_jit
    def _greedy_blocks(aug, elim, steps, floor, group, cnt, n, piv, hist, out):
        """`_greedy_one` on every block of aug (nb, B, B + 1) = [H | w] (read only), after the
        pre-elimination: elim (nb, B) marks the coordinates already removed."""
        nb, size = elim.shape
        h, w = np.empty((size, size)), np.empty(size)
        idx, rp, none = np.empty(size, np.int64), np.empty(size), np.empty(0)
        ws = np.empty((_LAZY + 1, size))
        for b in range(nb):
            r = 0
            for j in range(size):
                if not elim[b, j]:
                    idx[r] = j
                    r += 1
            for i in range(r):
                src = aug[b, idx[i]]
                for j in range(i + 1):
                    h[i, j] = src[idx[j]]
                w[i] = src[size]
            _greedy_one(h, w, idx, r, floor[b], steps[b], group, cnt[b], n, piv[b], hist[b],
                        out[b], rp, none, ws)  # fmt: skip

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _unpack_lower(row, h):
        """The packed triangle ``row`` into the lower triangle of h; returns the sum of its
        entries (NaN/Inf if any is: reassociating the sum lets it vectorize, nothing else)."""
        total, o = 0.0, 0
        for i in range(h.shape[0]):
            for j in range(i + 1):
                h[i, j] = row[o + j]
                total += row[o + j]
            o += i + 1
        return total

    @_jit
    def _pre_eliminate(h, w, removed, idx, full, rp):
        """Drop the coordinates ``removed`` from the block whose lower triangle is h (with w):
        those coupled to the others (a nonzero off-diagonal H entry) are eliminated one by one
        without being recorded (the joint Schur complement, in sequence), then the rest is
        compacted into h[:r, :r] with idx[:r] the remaining indices. Returns r, or -1 when a
        coupled removed coordinate has no positive pivot (H on the removed set is singular)."""
        size = w.shape[0]
        for i in range(size):  # the symmetric block
            for j in range(i + 1):
                full[i, j] = h[i, j]
                full[j, i] = h[i, j]
        for p in range(size):
            if not removed[p]:
                continue
            coupled = False
            for j in range(size):
                if j != p and full[p, j] != 0.0:
                    coupled = True
                    break
            if not coupled:
                continue
            dp, wp = full[p, p], w[p]
            if not dp > 0.0:
                return -1
            for j in range(size):
                rp[j] = full[p, j]
            for a in range(size):
                u = rp[a] / dp
                for j in range(size):
                    full[a, j] -= u * rp[j]
                w[a] -= u * wp
        r = 0
        for j in range(size):
            if not removed[j]:
                idx[r] = j
                r += 1
        for a in range(r):
            for j in range(a + 1):
                h[a, j] = full[idx[a], idx[j]]
            w[a] = w[idx[a]]
        return r

    @_jit
    def _greedy_packed(
        data, blocks, weights, pre, steps, group, cnt, n, piv, hist, out, bad, factor
    ):
        """`_greedy_one` on blocks ``blocks`` of packed float64 H (data) with weights (n_b, B)
        and already-removed coordinates pre (n_b, B), row i of the outputs being block
        blocks[i]. Each block is unpacked here; removed coordinates coupled to the others (a
        nonzero off-diagonal H entry) are first eliminated one by one without being recorded
        (the joint Schur complement, in sequence). The pivot floor is 1e-12 x the block's
        largest diagonal entry. bad[i] = 1 where block i holds NaN/Inf (then left undone).
        Where factor[b] (an empty ``factor``: nowhere), block b's packed row is overwritten by
        the elimination's factors (`_greedy_one`'s ``fac``) once it is unpacked."""
        size = weights.shape[1]
        full, w = np.empty((size, size)), np.empty(size)
        h = np.empty((size, size))
        idx, rp, none = np.empty(size, np.int64), np.empty(size), np.empty(0)
        ws = np.empty((_LAZY + 1, size))
        for i in range(blocks.shape[0]):
            b = blocks[i]
            row = data[b]
            total, top, removed = 0.0, 0.0, False
            for j in range(size):
                w[j] = weights[b, j]
                total += w[j]
                removed = removed or pre[b, j]
            total += _unpack_lower(row, h)
            for j in range(size):
                top = max(top, h[j, j])
            if not np.isfinite(total):
                bad[i] = 1
                continue
            lo = max(top, 1e-300) * 1e-12
            r = size
            for j in range(size):
                idx[j] = j
            if removed:
                r = _pre_eliminate(h, w, pre[b], idx, full, rp)
                if r < 0:
                    bad[i] = 2
                    continue
            fac = row if factor.shape[0] and factor[b] else none
            _greedy_one(h, w, idx, r, lo, steps[i], group, cnt[i], n, piv[i], hist[i], out[i],
                        rp, fac, ws)  # fmt: skip


def greedy_packed(data, blocks, weights, pre, steps, group, cnt, n, piv, hist, out, bad, factor):
    """`_greedy_packed` on numpy arrays that share the caller's tensors."""
    _c(data, blocks, weights, pre, steps, cnt, piv, hist, out, bad, factor)
    _greedy_packed(data, blocks, weights, pre, steps, int(group), cnt, int(n), piv, hist, out, bad,
                   factor)  # fmt: skip


def greedy_blocks(aug, elim, steps, floor, group, cnt, n, piv, hist, out) -> None:
    """`_greedy_blocks` on numpy arrays that share the caller's tensors."""
    _c(aug, elim, steps, floor, cnt, piv, hist, out)
    _greedy_blocks(aug, elim, steps, floor, int(group), cnt, int(n), piv, hist, out)


def _outputs(nb: int, T: int, B: int):
    """The compiled greedy's outputs: pivots (nb, T), scores (nb, T), weights (nb, B)."""
    return (torch.empty((nb, T), dtype=torch.long), torch.empty((nb, T), dtype=torch.float64),
            torch.empty((nb, B), dtype=torch.float64))  # fmt: skip


def greedy_batch(h, elim, steps, floor, cnt, n, group, T):
    """`sparseml.kernels.cap_greedy._greedy`'s loop by `greedy_blocks` (CPU): same inputs after the
    pre-elimination, same outputs."""
    nb, B = elim.shape
    piv, hist, out = _outputs(nb, T, B)
    cnt = torch.zeros((nb, 1), dtype=torch.long) if cnt is None else cnt
    greedy_blocks(
        h.numpy(), elim.numpy(), steps.contiguous().numpy(), floor[:, 0].contiguous().numpy(),
        group, cnt.numpy(), n, piv.numpy(), hist.numpy(), out.numpy(),
    )  # fmt: skip
    cum = hist.mul_(0.5).cumsum(1)
    return piv, cum, out


def greedy_from_packed(H, bi, W64, pre, steps, cnt, n, group, factor=None):
    """`sparseml.kernels.cap_greedy._greedy` of blocks ``bi`` by `greedy_packed`, reading packed H
    (`SymBlocks`, contiguous) directly (it also does the pre-elimination and the checks):
    same outputs. ``factor`` (n_b,) bool: blocks whose rows of H become their factors."""
    nb, T = bi.numel(), int(steps.max()) if bi.numel() else 0
    piv, hist, out = _outputs(nb, T, W64.shape[1])
    bad = torch.zeros(nb, dtype=torch.int32)
    cnt = torch.zeros((nb, 1), dtype=torch.long) if cnt is None else cnt.contiguous()
    greedy_packed(
        H.data.numpy(), bi.contiguous().numpy(), W64.numpy(), pre.numpy(),
        steps.contiguous().numpy(), group, cnt.numpy(), n, piv.numpy(), hist.numpy(),
        out.numpy(), bad.numpy(), np.zeros(0, np.bool_) if factor is None else factor.numpy(),
    )  # fmt: skip
    if (bad == 1).any():
        raise NumericalError("CAP received NaN/Inf in the inverse Fisher blocks")
    if bad.any():
        b = int(bi[int((bad == 2).nonzero()[0])])
        raise NumericalError(
            f"CAP: Fisher block {b} is singular on its already-pruned coordinates "
            "(the inverse Fisher is ill-conditioned: use a larger damp)"
        )
    return piv, hist.mul_(0.5).cumsum(1), out
