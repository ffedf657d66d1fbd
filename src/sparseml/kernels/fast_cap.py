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
from sparseml.kernels.fast_cap_sweep import Factors, Sweep, check_scale, factors, inverse_factor

__all__ = [
    "accumulate_shared_fisher",
    "fast_cap_losses",
    "fast_cap_prune",
    "fast_cap_scores",
    "factors",
    "group_count",
    "inverse_factor",
    "row_scales",
    "sweep_levels",
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


def _one_group(F: torch.Tensor, U: torch.Tensor | None):
    """A grouped F of one group is the shared Fisher: (F[0], U[0])."""
    if F.dim() == 3 and F.shape[0] == 1:
        return F[0], None if U is None else U[0]
    return F, U


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
    check_scale(row_scale, rows)
    if F.dim() == 2:
        if F.shape != (W.shape[1], W.shape[1]):
            raise ValueError(f"F must be ({W.shape[1]}, {W.shape[1]}), got {tuple(F.shape)}")
        U = inverse_factor(F, num_grads, damp) if U is None else U
        scores = W.double() ** 2 / U.diagonal() ** 2 / rows
        return scores if row_scale is None else scores * row_scale.to(scores)[:, None]
    f = Factors(W, F, num_grads, damp, valid, None, U)
    scores = W.double() ** 2 / f.dU2 * f.loss_scale[:, None]
    return scores if row_scale is None else scores * row_scale.to(scores)[:, None]


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
    sweeps: int = 1,
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

    sweeps (unstructured): reach the target in that many sweeps of rising sparsity
    (:func:`sweep_levels`), each choosing its removals from the weights the previous one left
    and keeping those it removed; 1 is one sweep, as the reference.
    """
    count_ok = isinstance(sweeps, int) and not isinstance(sweeps, bool) and sweeps >= 1
    if not count_ok or (sweeps > 1 and n is not None):
        raise ValueError(f"sweeps must be an int >= 1 (1 with N:M), got {sweeps!r} (n={n})")
    F, U = _one_group(F, U)
    groups = F.shape[0] if F.dim() == 3 else 1
    if isinstance(sparsity, (list, tuple)):
        if len(sparsity) != groups:
            raise ValueError(f"need one sparsity per group ({groups}), got {list(sparsity)}")
        sparsity = list(sparsity) if groups > 1 else sparsity[0]
    for value in sparsity if isinstance(sparsity, list) else [sparsity]:
        _check_sparsity(value)
    dtype, levels = W.dtype, [sparsity]
    if sweeps > 1:
        levels = sweep_levels(sparsity, sweeps, W.shape, groups, valid, pruned)
    for level in levels:
        sweep = Sweep(W, F, num_grads, damp, block_size, n, m, valid, pruned, row_scale, U)
        WT, removed, _ = sweep.run([level], zero_dead=zero_dead)
        W, pruned, U = WT.T, removed[0] & sweep.valid, sweep.U
    return W.to(dtype), ~removed[0] | ~sweep.valid


def sweep_levels(
    sparsity: float | list[float],
    sweeps: int,
    shape: tuple[int, int],
    groups: int = 1,
    valid: torch.Tensor | None = None,
    pruned: torch.Tensor | None = None,
) -> list:
    """The sparsities of ``sweeps`` successive sweeps of a layer of ``shape`` (rows, B) that
    end at ``sparsity`` (one value, or one per group of rows): each group's density falls
    geometrically from its current one (its valid entries not yet ``pruned``) to the target's,
    so every sweep removes the same fraction of what the previous one kept. A group already at
    or beyond its target stays there."""
    per_group = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity] * groups
    if len(per_group) != groups or sweeps < 1:
        raise ValueError(f"need one sparsity per group ({groups}) and sweeps >= 1")
    total = torch.full((groups,), shape[0] * shape[1] // groups, dtype=torch.float64)
    if valid is not None:
        total = valid.reshape(groups, -1).sum(dim=1).double().cpu()
    done = torch.zeros(groups, dtype=torch.float64)
    if pruned is not None:
        mask = pruned.bool() if valid is None else pruned.bool() & valid.bool()
        done = mask.reshape(groups, -1).sum(dim=1).double().cpu()
    start = (1.0 - done / total.clamp(min=1)).tolist()
    out = []
    for p in range(1, sweeps + 1):
        level = []
        for d0, target in zip(start, per_group):
            d1 = 1.0 - target
            level.append(
                target if p == sweeps or d0 <= d1 else 1.0 - d0 * (d1 / d0) ** (p / sweeps)
            )
        out.append(level if isinstance(sparsity, (list, tuple)) else level[0])
    return out


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
    ``max_rows`` then measures max_rows // G rows of every group: the first of its live rows
    in one fixed random order of the positions (the same order for every group).
    """
    levels = list(levels)
    if not levels or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in levels):
        raise ValueError(f"levels must be a non-empty list of sparsities in [0, 1], got {levels}")
    rows, B = W.shape
    check_scale(row_scale, rows)
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
    sweep = Sweep(W, F, num_grads, damp, block_size, None, None, valid, pruned, row_scale, U)
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


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"need 0 <= sparsity <= 1; got sparsity={sparsity}")
