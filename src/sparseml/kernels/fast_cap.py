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
    "fast_cap_losses",
    "fast_cap_prune",
    "fast_cap_scores",
    "factors",
    "group_count",
    "inverse_factor",
    "row_scales",
]


def group_count(rows: int, group_rows: int | None) -> int:
    """How many Fishers a layer of ``rows`` rows of B gets when each is shared by
    ``group_rows`` consecutive rows (None: one for all; the last group may be shorter)."""
    if group_rows is not None and group_rows < 1:
        raise ValueError(f"group_rows must be >= 1 or None, got {group_rows}")
    return 1 if group_rows is None else -(-rows // group_rows)


def accumulate_shared_fisher(
    grads: torch.Tensor,
    B: int,
    out: torch.Tensor | None = None,
    row_energy: torch.Tensor | None = None,
    group_rows: int | None = None,
) -> torch.Tensor:
    """Add sum_n G_n^T G_n to ``out`` and return it.

    grads (c, d): c flattened gradients of one layer; each is zero-padded to a multiple of B and
    viewed as (ceil(d / B), B), so padded coordinates get zero rows and columns. out (B, B) is
    updated in place (created as float64 zeros on the gradients' device when None; it may live
    on another device); the product is one GEMM in the gradients' dtype on their device.
    row_energy (ceil(d / B),), when given, gets sum_n ||G_n[r]||^2 added per row r in place:
    the trace of row r's own Fisher, from which :func:`row_scales` are derived.

    group_rows: each run of that many consecutive rows gets its own Fisher (the sum over its
    rows only); out is then (G, B, B) with G = :func:`group_count` (None: one (B, B) Fisher).
    """
    if grads.dim() != 2 or B < 1:
        raise ValueError(f"grads must be (c, d) and B >= 1; got {tuple(grads.shape)}, B={B}")
    c, d = grads.shape
    rows = -(-d // B)
    G = group_count(rows, group_rows)
    if rows * B == d and grads.is_contiguous():
        g = grads.view(c * rows, B)  # no copy of the chunk
    else:
        g = F_.pad(grads, (0, rows * B - d)).reshape(c * rows, B)
    shape = (B, B) if group_rows is None else (G, B, B)
    if out is None:
        out = torch.zeros(shape, dtype=torch.float64, device=grads.device)
    elif out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if group_rows is None:
        out += _gram(g).to(device=out.device, dtype=out.dtype)
    else:
        g3 = g.view(c, rows, B)
        for k in range(G):  # one group's rows of every sample (a copy of 1 / G of the chunk)
            part = g3[:, k * group_rows : (k + 1) * group_rows].reshape(-1, B)
            out[k] += _gram(part).to(device=out.device, dtype=out.dtype)
    if row_energy is not None:
        if row_energy.shape != (rows,):
            raise ValueError(f"row_energy must have shape ({rows},), got {tuple(row_energy.shape)}")
        # one dot product per row as a batched GEMM: no temporary of the chunk's size
        energy = torch.bmm(g.unsqueeze(1), g.unsqueeze(2)).view(c, rows).double().sum(dim=0)
        row_energy += energy.to(device=row_energy.device, dtype=row_energy.dtype)
    return out


# Column panel of :func:`_gram`: panels of 64 columns ran 1.2-1.5x faster than one GEMM for
# B = 96-1152 on a 2-core EPYC (float32, one thread).
PANEL = 64


def _gram(g: torch.Tensor) -> torch.Tensor:
    """g^T g for g (N, B): one GEMM per panel of PANEL columns against the columns from it on
    (the upper triangle), mirrored: about half the flops of one full GEMM for a wide B."""
    B = g.shape[1]
    if B <= PANEL:
        return g.mT @ g
    F = g.new_empty((B, B))
    for c1 in range(0, B, PANEL):
        c2 = min(c1 + PANEL, B)
        F[c1:c2, c1:] = g[:, c1:c2].mT @ g[:, c1:]
        F[c2:, c1:c2] = F[c1:c2, c2:].mT
    return F


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


def factors(F: torch.Tensor, num_grads: int, damp: float) -> torch.Tensor:
    """:func:`inverse_factor` of F (B, B), or of each group's F[g] of a grouped (G, B, B): what
    the sweep kernels take as ``U`` to skip factoring the same Fisher again."""
    if F.dim() != 3:
        return inverse_factor(F, num_grads, damp)
    U = torch.empty(F.shape, dtype=torch.float64, device=F.device)
    for g, f in enumerate(F):
        U[g] = inverse_factor(f, num_grads, damp)
    return U


def _one_group(F: torch.Tensor, U: torch.Tensor | None):
    """A grouped F of one group is the shared Fisher: (F[0], U[0])."""
    if F.dim() == 3 and F.shape[0] == 1:
        return F[0], None if U is None else U[0]
    return F, U


def _check_scale(row_scale: torch.Tensor | None, rows: int) -> None:
    if row_scale is not None and row_scale.shape != (rows,):
        raise ValueError(f"row_scale must have shape ({rows},), got {tuple(row_scale.shape)}")
    if row_scale is not None and not bool(torch.isfinite(row_scale).all()):
        raise NumericalError("FastCAP row scales hold NaN/Inf")


def fast_cap_scores(
    W: torch.Tensor,
    F: torch.Tensor,
    num_grads: int,
    damp: float = 1e-2,
    row_scale: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    U: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-weight loss estimates s_r w^2 / U_jj^2 / rows (rows, B) float64: what the sweep
    ranks a column by before any error is pushed onto it, in the units of one row's Fisher
    (F sums all rows, hence the division), so comparable across layers of any row count (the
    selectors use them to share one sparsity budget among layers). W (rows, B), F (B, B) or
    grouped (G, B, B) as for :func:`fast_cap_prune`; row_scale (rows,): s_r of
    :func:`row_scales` (None: all 1); padding scores whatever W holds there (zero). valid
    (rows, B): with a grouped F, rows without a valid entry do not count in their group. U:
    :func:`factors` of F when already computed."""
    rows = W.shape[0]
    F, U = _one_group(F, U)
    _check_scale(row_scale, rows)
    if F.dim() == 2:
        if F.shape != (W.shape[1], W.shape[1]):
            raise ValueError(f"F must be ({W.shape[1]}, {W.shape[1]}), got {tuple(F.shape)}")
        U = inverse_factor(F, num_grads, damp) if U is None else U
        scores = W.double() ** 2 / U.diagonal() ** 2 / rows
        return scores if row_scale is None else scores * row_scale.to(scores)[:, None]
    f = _Factors(W, F, num_grads, damp, valid, None, U)
    scores = W.double() ** 2 / f.dU2 * f.loss_scale[:, None]
    return scores if row_scale is None else scores * row_scale.to(scores)[:, None]


class _Factors:
    """A layer's inverse factors and what the sweep weighs rows by: U (B, B) or (G, B, B),
    dU2 (U_jj^2 / s_r: (B,), or (rows, B) with row scales or groups), inv_d (1 / U_jj: (B, 1)
    or (B, rows)) and loss_scale (rows,): s_r / (the rows sharing the row's Fisher)."""

    def __init__(self, W, F, num_grads, damp, valid, row_scale, U=None):
        rows, B = W.shape
        grouped = F.dim() == 3
        G = F.shape[0] if grouped else 1
        if F.dim() not in (2, 3) or tuple(F.shape[-2:]) != (B, B) or rows % G:
            raise ValueError(
                f"F must be ({B}, {B}) or (G, {B}, {B}) with G dividing the {rows} rows of W "
                f"{tuple(W.shape)}, got {tuple(F.shape)}"
            )
        _check_scale(row_scale, rows)
        self.G, self.R = G, rows // G
        if U is not None and U.shape != F.shape:
            raise ValueError(f"U must have F's shape {tuple(F.shape)}, got {tuple(U.shape)}")
        self.U = factors(F, num_grads, damp) if U is None else U
        if not grouped:
            self.dU2 = self.U.diagonal() ** 2
            self.inv_d = self.U.diagonal().reciprocal()[:, None]
            self.loss_scale = torch.full((rows,), 1.0 / rows, dtype=torch.float64, device=W.device)
        else:
            diag = self.U.diagonal(dim1=1, dim2=2)  # (G, B)
            self.dU2 = (diag**2).repeat_interleave(self.R, dim=0)
            self.inv_d = diag.reciprocal().T.repeat_interleave(self.R, dim=1)
            # a group's Fisher sums its rows (padding rows, all invalid, do not count)
            live = (
                torch.full((G,), self.R, device=W.device)
                if valid is None
                else valid.reshape(G, self.R, B).any(dim=2).sum(dim=1)
            )
            share = 1.0 / live.clamp(min=1).to(torch.float64)
            self.loss_scale = share.repeat_interleave(self.R).to(W.device)
        if row_scale is not None:  # rows weighted by their own curvature: s_r / U_jj^2
            self.dU2 = self.dU2 / row_scale.to(self.dU2)[:, None]
            self.loss_scale = self.loss_scale * row_scale.to(self.loss_scale)


def _select(scores: torch.Tensor, k: list[int]) -> torch.Tensor:
    """Bool mask of the k[l] smallest scores of each scores[l] (L, ...), ties broken by
    row-major position (one sort when every scores[l] is the same, as in a first block)."""
    flat = scores.flatten(1)
    if flat.shape[0] > 1 and bool((flat == flat[:1]).all()):
        order = torch.argsort(flat[0], stable=True).expand_as(flat)
    else:
        order = torch.argsort(flat, dim=1, stable=True)
    rank_taken = torch.arange(flat.shape[1], device=flat.device) < torch.tensor(
        k, device=flat.device
    ).unsqueeze(1)
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, rank_taken).view_as(scores)


def fast_cap_prune(
    W: torch.Tensor,
    F: torch.Tensor,
    num_grads: int,
    sparsity: float | list[float],
    *,
    damp: float = 1e-2,
    block_size: int = 128,
    n: int | None = None,
    m: int | None = None,
    valid: torch.Tensor | None = None,
    pruned: torch.Tensor | None = None,
    zero_dead: bool = False,
    row_scale: torch.Tensor | None = None,
    U: torch.Tensor | None = None,
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

    Grouped: F (G, B, B) gives each of G equal runs of rows (rows / G each; pad with invalid
    rows) its own Fisher, used for its rows' updates and scores; ``sparsity`` may then be one
    value per group, each group removing its own share of every column block. U: :func:`factors`
    of F when already computed.
    """
    F, U = _one_group(F, U)
    groups = F.shape[0] if F.dim() == 3 else 1
    if isinstance(sparsity, (list, tuple)):
        if len(sparsity) != groups:
            raise ValueError(f"need one sparsity per group ({groups}), got {list(sparsity)}")
        sparsity = list(sparsity) if groups > 1 else sparsity[0]
    for value in sparsity if isinstance(sparsity, list) else [sparsity]:
        _check_sparsity(value)
    sweep = _Sweep(W, F, num_grads, damp, block_size, n, m, valid, pruned, row_scale, U)
    WT, removed, _ = sweep.run([sparsity], zero_dead=zero_dead)
    return WT.T.to(W.dtype), ~removed[0] | ~sweep.valid


def fast_cap_losses(
    W: torch.Tensor,
    F: torch.Tensor,
    num_grads: int,
    levels: list[float],
    *,
    damp: float = 1e-2,
    block_size: int = 128,
    valid: torch.Tensor | None = None,
    pruned: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    max_rows: int | None = None,
    zero_dead: bool = False,
    U: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sweep's own loss curve of one layer: (removed, loss), float64 of len(levels).

    For each unstructured sparsity in ``levels`` the layer is swept as by
    :func:`fast_cap_prune` (same arguments, nothing written back): removed[k] counts the
    entries it removes (pruned ones included) and loss[k] is the quadratic-model loss of its
    result, sum_r s_r / rows * sum over removed (r, j) of (w_rj / U_jj)^2 / 2 with w the
    weights as updated when column j is reached. Each removal is an optimal OBS step on the
    columns not yet swept, so this sum is exactly 1/2 dW^T F_r dW summed over the rows, in one
    row's Fisher units like :func:`fast_cap_scores`: curves of layers of any row count add up.

    ``max_rows``: a layer of more rows is measured on that many of them (a fixed random
    subset; the sweeps select within it), and both outputs are scaled up by rows / max_rows:
    an unbiased estimate of the sum over rows at a fraction of the cost (counts are capped at
    the layer's valid entries). Losses are measured from the weights the sweep starts from
    (pruned, padded and, with ``zero_dead``, dead entries zeroed).

    Grouped F (G, B, B) (:func:`fast_cap_prune`): one curve per group, (removed, loss) of
    shape (len(levels), G), each in its group's rows' units (they add up like layers');
    ``max_rows`` then measures the same random positions of every group, max_rows // G each.
    """
    levels = list(levels)
    if not levels or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in levels):
        raise ValueError(f"levels must be a non-empty list of sparsities in [0, 1], got {levels}")
    rows, B = W.shape
    _check_scale(row_scale, rows)
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be an int >= 1 or None, got {max_rows!r}")
    F, U = _one_group(F, U)
    G = F.shape[0] if F.dim() == 3 else 1
    if rows % G:
        raise ValueError(f"the {rows} rows of W do not split into G = {G} equal groups")
    R = rows // G
    valid = torch.ones_like(W, dtype=torch.bool) if valid is None else valid.bool()
    total = valid.reshape(G, R * B).sum(dim=1).to(torch.float64)  # entries per group
    alive = valid.reshape(G, R, B).any(dim=2)  # (G, R): rows holding a valid entry
    live = alive.sum(dim=1)  # rows per group
    keep = R if max_rows is None else min(R, max(1, max_rows // G))
    if keep < R:  # a fixed random order of the positions; each group takes its live rows first
        order = torch.randperm(R, generator=torch.Generator().manual_seed(0))
        firsts = alive.cpu()[:, order]  # (G, R): is the row at each place of the order live
        rank = torch.argsort((~firsts).to(torch.uint8), dim=1, stable=True)[:, :keep]
        pick = order[rank].sort(dim=1).values + torch.arange(G)[:, None] * R
        pick = pick.flatten().to(W.device)
        W, valid, pruned, row_scale = (
            None if t is None else t[pick] for t in (W, valid, pruned, row_scale)
        )
    sweep = _Sweep(W, F, num_grads, damp, block_size, None, None, valid, pruned, row_scale, U)
    _, rm, loss = sweep.run(levels, zero_dead=zero_dead, with_loss=True)
    if not torch.isfinite(loss).all():
        raise NumericalError("FastCAP loss curve holds NaN/Inf (non-finite weights or scales)")
    # loss: the sweep weighs each row by s_r / (its group's rows), i.e. already scaled up;
    # counts are scaled up by the group's rows over those measured
    counted = (rm & sweep.valid).view(len(levels), G, -1).sum(dim=2).to(torch.float64)
    if G == 1:
        removed = counted[:, 0] * (rows / W.shape[0])
        return removed.clamp(max=float(total[0])).cpu(), loss.cpu()
    measured = sweep.valid.reshape(G, keep, B).any(dim=2).sum(dim=1).clamp(min=1)
    removed = counted * (live / measured).to(counted)
    return removed.minimum(total.to(removed)).cpu(), loss.cpu()


LAZY = 32


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"need 0 <= sparsity <= 1; got sparsity={sparsity}")


class _Sweep:
    """One layer's checked inputs and inverse factors, swept to several sparsities at once (U
    is factored once). With a grouped F (G, B, B) the rows form G equal runs, each updated and
    scored with its own factor and selecting its own share of every column block."""

    def __init__(self, W, F, num_grads, damp, block_size, n, m, valid, pruned, row_scale, U=None):
        rows, B = W.shape
        if num_grads < 1 or block_size < 1:
            raise ValueError(
                f"need num_grads >= 1, block_size >= 1; got num_grads={num_grads}, "
                f"block_size={block_size}"
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
        f = _Factors(W, F, num_grads, damp, valid, row_scale, U)
        self.W, self.F, self.bs, self.n, self.m, self.valid = W, F, bs, n, m, valid
        self.pruned = torch.zeros_like(valid) if pruned is None else pruned.bool() & valid
        self.U, self.dU2, self.inv_d, self.loss_scale = f.U, f.dU2, f.inv_d, f.loss_scale
        self.G, self.R = f.G, f.R

    def _dead(self) -> torch.Tensor:
        """(B, rows) True where the row's Fisher has a zero diagonal."""
        if self.F.dim() == 2:
            return (self.F.diagonal() == 0)[:, None].expand(-1, self.valid.shape[0])
        dead = self.F.diagonal(dim1=1, dim2=2) == 0  # (G, B)
        return dead.T.repeat_interleave(self.R, dim=1)

    def _counts(self, sparsities, count, forced) -> list[int]:
        """Entries each (copy, group) removes from a column block: count / forced (G,) are its
        valid / already pruned entries there."""
        out = []
        for sp in sparsities:
            per_group = sp if isinstance(sp, list) else [sp] * self.G
            if len(per_group) != self.G:
                raise ValueError(f"need one sparsity per group ({self.G}), got {per_group}")
            out += [max(round(v * c), f) for v, c, f in zip(per_group, count, forced)]
        return out

    def run(self, sparsities: list, zero_dead: bool = False, with_loss: bool = False):
        """(WT (B, L * rows) swept, removed (L, rows, B) bool, loss (L,) or None) for L =
        len(sparsities) (unstructured; N:M ignores them). The sweeps to the L sparsities run as
        one sweep of L copies of the rows (WT[:, l * rows : (l + 1) * rows] is copy l): every
        update is shared, only the selection differs per copy. Grouped: an entry of
        ``sparsities`` may be one value per group, and loss is (L, G)."""
        dU2, valid, pruned, n, bs = self.dU2, self.valid, self.pruned, self.n, self.bs
        (rows, B), L, G, R = valid.shape, len(sparsities), self.G, self.R
        # The sweep runs on the transpose: column j of W is the contiguous row WT[j], so the
        # rank-1 update of the columns after j walks memory in order.
        WT = self.W.T.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
        WT.masked_fill_((pruned | ~valid).T, 0.0)
        if zero_dead:
            WT.masked_fill_(self._dead(), 0.0)
        if L > 1:
            WT = WT.repeat(1, L)
        inv_d = self.inv_d if G == 1 or L == 1 else self.inv_d.repeat(1, L)
        removed = torch.zeros((L, rows, B), dtype=torch.bool, device=valid.device)
        shape = (L,) if G == 1 else (L, G)
        loss = torch.zeros(shape, dtype=torch.float64, device=WT.device) if with_loss else None
        for c1 in range(0, B, bs):
            c2 = min(c1 + bs, B)
            W1, v1 = WT[c1:c2], valid[:, c1:c2]  # W1: a view, (cols, L*rows)
            if n is None:
                # Forced-pruned entries score -inf (taken first), padding +inf (never counted).
                s = W1.view(-1, L, rows).permute(1, 2, 0) ** 2 / dU2[..., c1:c2]
                s = s.masked_fill(pruned[:, c1:c2], -1.0).masked_fill(~v1, float("inf"))
                count = v1.reshape(G, -1).sum(dim=1).tolist()
                forced = pruned[:, c1:c2].reshape(G, -1).sum(dim=1).tolist()
                k = self._counts(sparsities, count, forced)
                rm1 = _select(s.reshape(L * G, R, c2 - c1), k).view(L, rows, -1) | ~v1
            else:
                rm1 = (pruned[:, c1:c2] | ~v1).unsqueeze(0)
            rmT = rm1.permute(2, 0, 1).reshape(c2 - c1, L * rows)  # (cols, L*rows)
            # E1[j] holds removed / U_jj until column j is reached, then that column's errors.
            E1 = rmT.to(WT.dtype) * inv_d[c1:c2]
            self._sweep_block(WT, c1, c2, rmT, E1, inv_d)
            W1.masked_fill_(rmT, 0.0)  # removed columns are exactly 0 (never read again)
            removed[:, :, c1:c2] = rmT.view(-1, L, rows).permute(1, 2, 0)
            if loss is not None and G == 1:
                loss += (E1.square().view(-1, L, rows) @ self.loss_scale).sum(dim=0) / 2
            elif loss is not None:
                e2 = E1.square().view(-1, L, G, R) * self.loss_scale.view(G, R)
                loss += e2.sum(dim=(0, 3)) / 2
        if not torch.isfinite(WT).all():
            raise NumericalError("FastCAP sweep produced NaN/Inf weights")
        return WT, removed, loss

    def _sweep_block(self, WT, c1: int, c2: int, rmT, E1, inv_d) -> None:
        """Sweep columns c1 .. c2 - 1 of WT (B, copies * rows) in place: each removed entry's
        error (E1 (cols, copies * rows), filled in as the columns are reached) is pushed onto
        the later columns; N:M groups pick their entries (rmT) as they are reached.

        Lazy updates in runs of LAZY columns: the rank-1 steps stay within a run (a cache-sized
        slice), whose errors then reach all later columns in one GEMM (one per row group). With
        N:M a run is whole groups, so a group's picks read all its columns up to date."""
        U, dU2, valid, n, m, G, R = self.U, self.dU2, self.valid, self.n, self.m, self.G, self.R
        W1, U1, B = WT[c1:c2], U[..., c1:c2, c1:c2], U.shape[-1]
        L = WT.shape[1] // valid.shape[0]
        lazy = LAZY if m is None else m * max(1, LAZY // m)
        for r1 in range(0, c2 - c1, lazy):
            r2 = min(r1 + lazy, c2 - c1)
            for j in range(r1, r2):
                if n is not None and j % m == 0:
                    # N:M picks use the weights as updated by the columns already swept.
                    g, cols = slice(j, j + m), slice(c1 + j, c1 + j + m)
                    s = (W1[g].T ** 2 / dU2[..., cols]).masked_fill(rmT[g].T, -1.0)
                    pick = torch.zeros_like(s, dtype=torch.bool)
                    pick.scatter_(1, torch.topk(s, n, dim=1, largest=False).indices, True)
                    rmT[g] |= pick.T & valid[:, cols].T
                    E1[g] = rmT[g].to(WT.dtype) * inv_d[cols]
                err = E1[j].mul_(W1[j])
                if G == 1:
                    W1[j:r2].addr_(U1[j, j:r2], err, alpha=-1.0)
                else:  # row group g moves along its own factor's row j
                    coef = U1[:, j, j:r2].T[:, None, :, None]
                    W1[j:r2].view(r2 - j, L, G, R).addcmul_(coef, err.view(1, L, G, R), value=-1.0)
            if c1 + r2 >= B:
                continue
            if G == 1:
                WT[c1 + r2 :].addmm_(U[c1 + r1 : c1 + r2, c1 + r2 :].T, E1[r1:r2], alpha=-1.0)
            else:
                k = r2 - r1
                E = E1[r1:r2].view(k, L, G, R).permute(2, 0, 1, 3).reshape(G, k, L * R)
                P = torch.bmm(U[:, c1 + r1 : c1 + r2, c1 + r2 :].transpose(1, 2), E)
                WT[c1 + r2 :].view(-1, L, G, R).sub_(P.view(G, -1, L, R).permute(1, 2, 0, 3))
