"""FastCAP, the fast variant of CAP: Correlation-Aware Pruning for Highly-Accurate Sparse
Vision Models.

Paper: https://arxiv.org/abs/2210.09223 (Kuznedelev, Kurtic, Frantar, Alistarh).

A layer's zero-padded flattening is cut into rows of B coordinates that all share one B x B
empirical Fisher F = sum_n G_n^T G_n (G_n: one gradient viewed as (rows, B)). Pruning is a
SparseGPT-style column sweep: with U the upper Cholesky factor of (F + damp)^-1, column j is
scored by w^2 / U_jj^2 and the error of every removed weight is pushed onto the columns not yet
swept, with lazy updates per column block. Unlike the reference implementation, the swept
weights are returned (the write-back), the sweep starts at column 0 and padding is handled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from sparseml.errors import NumericalError

__all__ = [
    "accumulate_shared_fisher",
    "fast_cap_prune",
    "fast_cap_scores",
    "inverse_factor",
    "row_scales",
]


def accumulate_shared_fisher(
    grads: torch.Tensor,
    B: int,
    out: torch.Tensor | None = None,
    row_energy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add sum_n G_n^T G_n to ``out`` and return it.

    grads (c, d): c flattened gradients of one layer; each is zero-padded to a multiple of B and
    viewed as (ceil(d / B), B), so padded coordinates get zero rows and columns. out (B, B) is
    updated in place (created as float64 zeros on the gradients' device when None; it may live
    on another device); the product is one GEMM in the gradients' dtype on their device.
    row_energy (ceil(d / B),), when given, gets sum_n ||G_n[r]||^2 added per row r in place:
    the trace of row r's own Fisher, from which :func:`row_scales` are derived.
    """
    if grads.dim() != 2 or B < 1:
        raise ValueError(f"grads must be (c, d) and B >= 1; got {tuple(grads.shape)}, B={B}")
    c, d = grads.shape
    rows = -(-d // B)
    if rows * B == d and grads.is_contiguous():
        g = grads.view(c * rows, B)  # no copy of the chunk
    else:
        g = F_.pad(grads, (0, rows * B - d)).reshape(c * rows, B)
    if out is None:
        out = torch.zeros((B, B), dtype=torch.float64, device=grads.device)
    elif out.shape != (B, B):
        raise ValueError(f"out must have shape ({B}, {B}), got {tuple(out.shape)}")
    out += (g.mT @ g).to(device=out.device, dtype=out.dtype)
    if row_energy is not None:
        if row_energy.shape != (rows,):
            raise ValueError(f"row_energy must have shape ({rows},), got {tuple(row_energy.shape)}")
        # one dot product per row as a batched GEMM: no temporary of the chunk's size
        energy = torch.bmm(g.unsqueeze(1), g.unsqueeze(2)).view(c, rows).double().sum(dim=0)
        row_energy += energy.to(device=row_energy.device, dtype=row_energy.dtype)
    return out


def row_scales(row_energy: torch.Tensor) -> torch.Tensor:
    """Each row's Fisher trace relative to the mean row's, float64 (mean 1; all ones when no
    row has any curvature). With s_r the scale, row r's Fisher is approximated by s_r times
    the mean row Fisher F / (num_grads * rows): a diagonal output factor, as in K-FAC, that
    leaves the sweep's updates unchanged (they are scale-free) and weights its scores."""
    if row_energy.dim() != 1:
        raise ValueError(
            f"row_energy must be 1-D (one value per row), got {tuple(row_energy.shape)}"
        )
    e = row_energy.double()
    if not torch.isfinite(e).all() or bool((e < 0).any()):
        raise NumericalError("FastCAP row energies hold NaN/Inf or negative values")
    total = e.sum()
    if total <= 0:
        return torch.ones_like(e)
    return e * (e.numel() / total)


def inverse_factor(F: torch.Tensor, num_grads: int, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (F / num_grads + damp * mean(diag) I)^-1, float64 (what
    :func:`fast_cap_scores` and :func:`fast_cap_prune` rank and update with)."""
    if F.dim() != 2 or F.shape[0] != F.shape[1] or num_grads < 1:
        raise ValueError(
            f"F must be square (B, B) and num_grads >= 1; got {tuple(F.shape)}, {num_grads}"
        )
    Fd = F.double() / num_grads
    mean = Fd.diagonal().mean()
    if not torch.isfinite(Fd).all():
        raise NumericalError("FastCAP Fisher holds NaN/Inf")
    if mean <= 0:  # no curvature information at all: fall back to magnitude scores
        Fd, mean = torch.eye(Fd.shape[0], dtype=Fd.dtype, device=Fd.device), 1.0
    # Dead coordinates (F_jj = 0) keep only the damping, i.e. they are cheap to remove.
    eye = torch.eye(Fd.shape[0], dtype=Fd.dtype, device=Fd.device)
    for extra in (0.0, 1e-2):
        L, info = torch.linalg.cholesky_ex(Fd + (damp + extra) * mean * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
    raise NumericalError(f"FastCAP Fisher is not positive definite even with damp={damp}+1e-2")


def _check_scale(row_scale: torch.Tensor | None, rows: int) -> None:
    if row_scale is not None and row_scale.shape != (rows,):
        raise ValueError(f"row_scale must have shape ({rows},), got {tuple(row_scale.shape)}")


def fast_cap_scores(
    W: torch.Tensor,
    F: torch.Tensor,
    num_grads: int,
    damp: float = 1e-2,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-weight loss estimates s_r w^2 / U_jj^2 / rows (rows, B) float64: what the sweep
    ranks a column by before any error is pushed onto it, in the units of one row's Fisher
    (F sums all rows, hence the division), so comparable across layers of any row count (the
    selectors use them to share one sparsity budget among layers). W (rows, B), F (B, B) as
    for :func:`fast_cap_prune`; row_scale (rows,): s_r of :func:`row_scales` (None: all 1);
    padding scores whatever W holds there (zero)."""
    rows, B = W.shape
    if F.shape != (B, B):
        raise ValueError(f"F must be ({B}, {B}), got {tuple(F.shape)}")
    _check_scale(row_scale, rows)
    U = inverse_factor(F, num_grads, damp)
    scores = W.double() ** 2 / U.diagonal() ** 2 / rows
    return scores if row_scale is None else scores * row_scale.to(scores)[:, None]


def _select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest scores, ties broken by row-major position."""
    flat = scores.flatten()
    sel = torch.zeros_like(flat, dtype=torch.bool)
    sel[torch.argsort(flat, stable=True)[:k]] = True
    return sel.view_as(scores)


def fast_cap_prune(
    W: torch.Tensor,
    F: torch.Tensor,
    num_grads: int,
    sparsity: float,
    *,
    damp: float = 1e-2,
    block_size: int = 128,
    n: int | None = None,
    m: int | None = None,
    valid: torch.Tensor | None = None,
    pruned: torch.Tensor | None = None,
    zero_dead: bool = False,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one layer with the FastCAP column sweep; returns (W_new, mask), mask True = kept.

    W (rows, B): the layer's zero-padded flattening cut into rows of B; F (B, B): shared Fisher
    sum over ``num_grads`` gradients (:func:`accumulate_shared_fisher`). ``damp`` is relative:
    damp * mean(diag F / num_grads) is added to the diagonal. Unstructured: in every column block
    of ``block_size`` columns exactly round(sparsity * #valid entries) valid entries are removed
    (already ``pruned`` ones count first and are never re-opened). N:M (n and m given, B % m ==
    0): the n lowest-scoring entries of every group of m consecutive columns are removed;
    ``sparsity`` is then ignored. valid (rows, B) bool is False on padding: padded entries are
    held at 0, never counted and reported as kept. zero_dead zeroes the weights of coordinates
    whose Fisher diagonal is 0 before the sweep (the reference behaviour). row_scale (rows,)
    weights row r's unstructured scores by s_r (:func:`row_scales`; None: the reference's
    unweighted scores); the updates do not depend on it. W_new (rows, B) has W's dtype and
    exact zeros where the mask is False.
    """
    rows, B = W.shape
    if F.shape != (B, B):
        raise ValueError(f"F must be ({B}, {B}) to match W {tuple(W.shape)}, got {tuple(F.shape)}")
    if num_grads < 1 or block_size < 1 or not 0.0 <= sparsity <= 1.0:
        raise ValueError(
            f"need num_grads >= 1, block_size >= 1, 0 <= sparsity <= 1; got num_grads="
            f"{num_grads}, block_size={block_size}, sparsity={sparsity}"
        )
    bs = min(block_size, B)
    if (n is None) != (m is None) or (m is not None and (not 0 < n <= m or B % m or bs % m)):
        raise ValueError(
            f"N:M needs both n and m with 0 < n <= m dividing B={B} and block_size={bs}; "
            f"got n={n}, m={m}"
        )
    valid = torch.ones_like(W, dtype=torch.bool) if valid is None else valid.bool()
    if m is not None:
        vg = valid.view(rows, -1, m)
        if bool((vg.any(2) != vg.all(2)).any()):
            raise ValueError("N:M groups must be either all valid or all padding")
    pruned = torch.zeros_like(valid) if pruned is None else pruned.bool() & valid
    _check_scale(row_scale, rows)
    U = inverse_factor(F, num_grads, damp)
    # The sweep runs on the transpose: column j of W is the contiguous row WT[j], so the
    # rank-1 update of the columns after j walks memory in order.
    WT = W.T.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    WT.masked_fill_((pruned | ~valid).T, 0.0)
    if zero_dead:
        WT[F.diagonal() == 0] = 0.0
    dU2 = U.diagonal() ** 2
    if row_scale is not None:  # rows weighted by their own curvature: s_r / U_jj^2
        dU2 = dU2 / row_scale.to(dU2)[:, None]
    inv_d = U.diagonal().reciprocal()
    removed = torch.zeros_like(valid)
    for c1 in range(0, B, bs):
        c2 = min(c1 + bs, B)
        W1, U1, v1 = WT[c1:c2], U[c1:c2, c1:c2], valid[:, c1:c2]  # W1: a view, (columns, rows)
        if n is None:
            # Forced-pruned entries score -inf (taken first), padding +inf (never counted).
            s = (W1.T**2 / dU2[..., c1:c2]).masked_fill(pruned[:, c1:c2], -1.0)
            s.masked_fill_(~v1, float("inf"))
            k = max(round(sparsity * int(v1.sum())), int(pruned[:, c1:c2].sum()))
            rm1 = _select(s, k) | ~v1
        else:
            rm1 = pruned[:, c1:c2] | ~v1
        # E1[j] holds removed / U_jj until column j is reached, then that column's errors.
        E1 = rm1.T.to(WT.dtype) * inv_d[c1:c2, None]
        for j in range(c2 - c1):
            if n is not None and j % m == 0:
                # N:M picks use the weights as updated by the columns already swept.
                g = slice(j, j + m)
                s = (W1[g].T ** 2 / dU2[..., c1 + j : c1 + j + m]).masked_fill(rm1[:, g], -1.0)
                pick = torch.zeros_like(s, dtype=torch.bool)
                pick.scatter_(1, torch.topk(s, n, dim=1, largest=False).indices, True)
                rm1[:, g] |= pick & v1[:, g]
                E1[g] = rm1[:, g].T.to(WT.dtype) * inv_d[c1 + j : c1 + j + m, None]
            err = E1[j].mul_(W1[j])
            W1[j:].addr_(U1[j, j:], err, alpha=-1.0)
        W1.masked_fill_(rm1.T, 0.0)  # removed columns are exactly 0 (never read again)
        WT[c2:].addmm_(U[c1:c2, c2:].T, E1, alpha=-1.0)
        removed[:, c1:c2] = rm1
    if not torch.isfinite(WT).all():
        raise NumericalError("FastCAP sweep produced NaN/Inf weights")
    return WT.T.to(W.dtype), ~removed | ~valid
