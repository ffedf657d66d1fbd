"""CAP's greedy elimination in torch, a batch of blocks at a time: the path on accelerators
(and on CPU without numba, with `SPARSEML_NATIVE=0`, or for blocks above
`sparseml.kernels.native_cap.GREEDY_MAX_BLOCK`), and the second oracle of the compiled
greedy's tests. The driver and the public functions are in `sparseml.kernels.cap`.
"""

from __future__ import annotations

import torch

from sparseml.errors import NumericalError
from sparseml.kernels import native, native_cap
from sparseml.kernels.packed import SymBlocks

# Pivots below this fraction of the block's largest initial diagonal entry are rounding noise.
_PIVOT_FLOOR = 1e-12
# Greedy steps whose rank-1 downdates are applied together as one GEMM: at most _LAZY, about
# B / 8 (fastest on 2 cores, measured at B = 128, 192, 256: 16, 24, 32; a deeper queue makes
# every step's pivot-row update longer, a shallower one more flushes of the whole batch).
_LAZY = 32


def _lazy_steps(B: int) -> int:
    return max(8, min(_LAZY, B // 8))


def _pre_eliminate(aug: torch.Tensor, elim: torch.Tensor, src: torch.Tensor) -> None:
    """Remove the already-eliminated set P of every block of aug = [H | w] in one Schur step.

    Pruned coordinates normally have zero gradient, hence rows of H equal to e_p / lambda and
    nothing to do; only blocks where P is coupled to the rest pay for the O(B^3) solve.
    """
    if not elim.any():
        return
    coupled = ((torch.count_nonzero(src, dim=2) > 1) & elim).any(1)  # src: contiguous H rows
    if not coupled.any():
        return
    c = coupled.nonzero().squeeze(1)
    ac, P = aug[c], elim[c]
    hc = ac[:, :, :-1]
    both = P.unsqueeze(2) & P.unsqueeze(1)
    eye = torch.eye(hc.shape[1], dtype=hc.dtype, device=hc.device).expand_as(hc)
    cols = hc * P.unsqueeze(1)  # H[:, P], other columns zeroed
    # Block-diagonal [H_PP, I] applied to the P rows of [H | w] gives H_PP^-1 [H[P, :] | w_P].
    X = torch.linalg.solve(torch.where(both, hc, eye), ac * P.unsqueeze(2))
    aug[c] = ac - cols @ X


def _greedy(h, wb, elim, steps, gid=None, cnt=None, n=0, group=0):
    """Greedy OBS elimination of ``steps[b]`` coordinates in each block of one batch.

    h (nb, B, B + 1) float64 holds the batch's H in h[:, :, :B] (this function owns and
    overwrites it); wb (nb, B) is read only; elim (nb, B) marks coordinates eliminated first
    (modified). N:M: gid (nb, B) group id, cnt (nb, G) eliminated per group; a group holding
    n eliminated coordinates is closed (``group``: the group size m). Returns pivots (nb, T)
    as original indices (-1 once a block has stopped), cumulative losses (nb, T) with 1/2
    included, and the final weights (nb, B) with every eliminated coordinate exactly 0.

    Blocked (lazy) downdates: the rank-1 Schur updates of the last k <= ``_LAZY`` steps are
    kept as factors, u_j (nb, r) and the pivot rows R_j (nb, r + 1), with the current
    [H | w] = h - sum_j u_j R_j^T; a step only needs the pivot's row of it (a (1, k) x
    (k, r + 1) product), the diagonal and w, which are downdated in O(r). Every `_lazy_steps`
    steps the pending updates are applied to h at once as
    one batched GEMM, so the O(B^3) work of a block runs at matrix-multiply speed instead of as
    B memory-bound rank-1 updates. On CPU the compiled greedy
    (`sparseml.kernels.native_cap.greedy_blocks`) runs the same steps block by block instead:
    the same pivots, unless rounding breaks a near-tie (its downdates round differently).
    """
    nb, B = elim.shape
    dev, lazy = h.device, _lazy_steps(B)
    # w rides along as column B of an augmented [H | w]: one update moves both; every
    # compaction below frees the previous copy.
    h[:, :, B] = wb
    if not torch.isfinite(h.sum()):  # per batch: no H-sized temporary
        raise NumericalError("CAP received NaN/Inf in the inverse Fisher blocks")
    floor = h.diagonal(dim1=1, dim2=2).amax(1, keepdim=True).clamp_min(1e-300) * _PIVOT_FLOOR
    _pre_eliminate(h, elim, h[:, :, :B])
    T = int(steps.max()) if nb else 0
    if native.ENABLED and dev.type == "cpu" and B <= native_cap.GREEDY_MAX_BLOCK:
        return native_cap.greedy_batch(h, elim, steps, floor, cnt, n, group, T)
    t_all = int(steps.min()) if nb else 0  # steps before the first block stops
    piv, hist = [], []  # per step: (nb,) original index and score of the pivot
    idx = torch.arange(B, device=dev).expand(nb, B)
    r, k = B, 0
    U = R = d = w = base = None
    for t in range(T):
        if k == lazy or t == 0:
            if k:  # apply the pending downdates: h -= U^T R
                h.baddbmm_(U[:k].permute(1, 2, 0), R[:k].transpose(0, 1), alpha=-1.0)
                k = 0
            r_new = int((~elim).sum(1).max())
            # Dropping eliminated rows/columns cuts the downdate flops from B^3 to ~B^3/3; a
            # gather costs a few flushes, so compact only after a third of r is gone.
            if r - r_new >= max(4, r // 3) or (t == 0 and r_new < r):
                keep = torch.argsort(elim.to(torch.int8), dim=1, stable=True)[:, :r_new]
                cols = torch.cat([keep, torch.full_like(keep[:, :1], r)], 1)
                rows = (keep + torch.arange(nb, device=dev).unsqueeze(1) * r).flatten()
                h = h.view(nb * r, r + 1).index_select(0, rows).view(nb, r_new, r + 1)
                h = h.gather(2, cols.unsqueeze(1).expand(nb, r_new, r_new + 1))
                elim, idx = elim.gather(1, keep), idx.gather(1, keep)
                gid = None if gid is None else gid.gather(1, keep)
                r, U = r_new, None
            if U is None:  # step-major: U[k] = u (nb, r), R[k] the pivot rows of [H | w]
                U = torch.empty((lazy, nb, r), dtype=h.dtype, device=dev)
                R = torch.empty((lazy, nb, r + 1), dtype=h.dtype, device=dev)
                base = torch.arange(nb, device=dev) * r
            d, w = h.diagonal(dim1=1, dim2=2).clone(), h[:, :, r].clone()
        diag = d.clamp_min(floor)
        s = w.square().div_(diag)
        closed = elim if gid is None else elim | (cnt.gather(1, gid) >= n)
        sp, p = s.masked_fill_(closed, float("inf")).min(1)
        hist.append(sp)
        p1 = p.unsqueeze(1)
        piv.append(idx.gather(1, p1))
        row = R[k]  # [H[p, :], w_p] of the current [H | w] (H symmetric)
        torch.index_select(h.view(nb * r, r + 1), 0, base + p, out=row)
        if k:
            up = U[:k].gather(2, p.view(1, nb, 1).expand(k, nb, 1))  # (k, nb, 1)
            row.unsqueeze(1).baddbmm_(up.permute(1, 2, 0), R[:k].transpose(0, 1), alpha=-1.0)
        u = U[k]
        torch.div(row[:, :r], diag.gather(1, p1), out=u)
        if t < t_all:
            elim.scatter_(1, p1, True)
        else:  # some blocks are done: their pivot is a dummy and must change nothing
            active = (steps > t).unsqueeze(1)
            u *= active
            elim.scatter_(1, p1, elim.gather(1, p1) | active)
        if gid is not None:
            cnt.scatter_add_(1, gid.gather(1, p1), (steps > t).unsqueeze(1).long())
        d.addcmul_(u, row[:, :r], value=-1.0)
        w.addcmul_(u, row[:, r : r + 1], value=-1.0)
        k += 1
    done = torch.arange(T, device=dev) >= steps.unsqueeze(1)
    piv = torch.cat(piv, 1) if T else torch.empty((nb, 0), dtype=torch.long, device=dev)
    piv.masked_fill_(done, -1)
    hist = torch.stack(hist, 1) if T else torch.empty((nb, 0), dtype=h.dtype, device=dev)
    cum = hist.masked_fill_(done, 0.0).mul_(0.5).cumsum(1)
    out = torch.zeros((nb, B), dtype=h.dtype, device=dev)
    final = h[:, :, r] if w is None else w
    out.scatter_(1, idx, final.masked_fill(elim, 0.0))
    return piv, cum, out


def _load(H, rows, nb: int, B: int) -> torch.Tensor:
    """A float64 (nb, B, B + 1) working array with blocks ``rows`` of H in [:, :, :B]."""
    h = torch.empty((nb, B, B + 1), dtype=torch.float64, device=H.device)
    if isinstance(H, SymBlocks):  # float64 lower triangles, unpacked a few rows at a time
        H.unpack_into(rows, h)
    else:
        h[:, :, :B] = H[rows]
    return h
