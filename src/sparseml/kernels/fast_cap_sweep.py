"""FastCAP's column sweep: the inverse factors of a shared (or per row group) Fisher and the
SparseGPT-style sweep that prunes a layer's rows with them (Kuznedelev, Kurtic, Frantar,
Alistarh, https://arxiv.org/abs/2210.09223). The entry points that check a user's layer and
call it are in :mod:`sparseml.kernels.fast_cap`.
"""

from __future__ import annotations

import torch

from sparseml.errors import NumericalError
from sparseml.kernels import native_fast_cap

__all__ = ["Factors", "Sweep", "check_scale", "factors", "inverse_factor", "select_smallest"]


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
    # Dead coordinates (F_jj = 0) keep only the damping, i.e. they are cheap to remove. Two
    # B x B at most besides F: Fd, and one buffer factored, inverted and factored in place.
    info = torch.empty((), dtype=torch.int32, device=Fd.device)
    for extra in (0.0, 1e-2):
        A = Fd.clone()
        A.diagonal().add_((damp + extra) * mean)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info == 0:
                return A
        del A
    raise NumericalError(f"FastCAP Fisher is not positive definite even with damp={damp}+1e-2")


def factors(F: torch.Tensor, num_grads: int, damp: float) -> torch.Tensor:
    """:func:`inverse_factor` of F (B, B), or of each group's F[g] of a grouped (G, B, B): what
    the sweep kernels take as ``U`` to skip factoring the same Fisher again. One group at a
    time, so the working copies stay a few B x B (a batched call holds several (G, B, B))."""
    if F.dim() != 3:
        return inverse_factor(F, num_grads, damp)
    U = torch.empty(F.shape, dtype=torch.float64, device=F.device)
    for g, f in enumerate(F):
        U[g] = inverse_factor(f, num_grads, damp)
    return U


def check_scale(row_scale: torch.Tensor | None, rows: int) -> None:
    if row_scale is not None and row_scale.shape != (rows,):
        raise ValueError(f"row_scale must have shape ({rows},), got {tuple(row_scale.shape)}")
    if row_scale is not None and not bool(torch.isfinite(row_scale).all()):
        raise NumericalError("FastCAP row scales hold NaN/Inf")


class Factors:
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
        check_scale(row_scale, rows)
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


# Above this many distinct counts in one call, one batched sort beats a search per count.
SEARCHES = 4


def select_smallest(scores: torch.Tensor, k: list[int]) -> torch.Tensor:
    """Bool mask of the k[l] smallest scores of each scores[l] (L, ...), ties broken by
    row-major position: a stable sort's first k[l] entries (NaN last). Without NaN and with
    few distinct counts they are found without a sort, which costs more than the rest of a
    column block's sweep: the k-th smallest value, every entry below it, then its ties in
    order, one batched search per distinct count."""
    flat = scores.flatten(1)
    if len(k) != flat.shape[0]:
        raise ValueError(f"need one count per copy ({flat.shape[0]}), got {len(k)}")
    if len(set(k)) > SEARCHES or bool(torch.isnan(flat).any()):
        return _sorted_smallest(flat, k).view_as(scores)
    out = torch.empty_like(flat, dtype=torch.bool)
    n = flat.shape[1]
    for count in sorted(set(k)):
        rows = [i for i, c in enumerate(k) if c == count]
        pick = slice(None) if len(rows) == len(k) else torch.tensor(rows, device=flat.device)
        if count <= 0 or count >= n:
            out[pick] = count > 0
            continue
        values = flat[pick]
        kth = values.kthvalue(count, dim=1, keepdim=True).values
        below, ties = values < kth, values == kth
        extra = count - below.sum(dim=1, keepdim=True)  # the earliest ties fill the rest
        out[pick] = below | (ties & (ties.cumsum(dim=1) <= extra))
    return out.view_as(scores)


def _sorted_smallest(flat: torch.Tensor, k: list[int]) -> torch.Tensor:
    """:func:`select_smallest` of flat (L, n) by a stable sort (one when all rows are equal)."""
    if flat.shape[0] > 1 and bool((flat == flat[:1]).all()):
        order = torch.argsort(flat[0], stable=True).expand_as(flat)
    else:
        order = torch.argsort(flat, dim=1, stable=True)
    counts = torch.tensor(k, device=flat.device).unsqueeze(1)
    taken = torch.arange(flat.shape[1], device=flat.device) < counts
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, taken)


LAZY = 32


class Sweep:
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
        f = Factors(W, F, num_grads, damp, valid, row_scale, U)
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
        compiled = native_fast_cap.usable(WT, n, self.R)
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
                rm1 = select_smallest(s.reshape(L * G, R, c2 - c1), k).view(L, rows, -1) | ~v1
            else:
                rm1 = (pruned[:, c1:c2] | ~v1).unsqueeze(0)
            rmT = rm1.permute(2, 0, 1).reshape(c2 - c1, L * rows)  # (cols, L*rows)
            # E1[j] holds removed / U_jj until column j is reached, then that column's errors.
            if compiled:  # the compiled steps read E1's rows in order (no second copy)
                E1 = rmT.to(WT.dtype, memory_format=torch.contiguous_format).mul_(inv_d[c1:c2])
            else:
                E1 = rmT.to(WT.dtype) * inv_d[c1:c2]
            self._sweep_block(WT, c1, c2, rmT, E1, inv_d, compiled)
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

    def _sweep_block(self, WT, c1: int, c2: int, rmT, E1, inv_d, compiled: bool) -> None:
        """Sweep columns c1 .. c2 - 1 of WT (B, copies * rows) in place: each removed entry's
        error (E1 (cols, copies * rows), filled in as the columns are reached) is pushed onto
        the later columns; N:M groups pick their entries (rmT) as they are reached.

        Lazy updates in runs of LAZY columns: the rank-1 steps stay within a run (a cache-sized
        slice; compiled on CPU, `native_fast_cap`), whose errors then reach all later columns
        in one GEMM (one per row group). With N:M a run is whole groups, so a group's picks
        read all its columns up to date."""
        U, G, R, B = self.U, self.G, self.R, self.U.shape[-1]
        L = WT.shape[1] // self.valid.shape[0]
        lazy = LAZY if self.m is None else self.m * max(1, LAZY // self.m)
        for r1 in range(0, c2 - c1, lazy):
            r2 = min(r1 + lazy, c2 - c1)
            if compiled:
                native_fast_cap.sweep_run(WT, E1, U if G > 1 else U[None], c1, r1, r2, R)
            else:
                self._steps(WT[c1:c2], c1, r1, r2, rmT, E1, inv_d)
            if c1 + r2 >= B:
                continue
            if G == 1:
                WT[c1 + r2 :].addmm_(U[c1 + r1 : c1 + r2, c1 + r2 :].T, E1[r1:r2], alpha=-1.0)
            else:
                k = r2 - r1
                E = E1[r1:r2].view(k, L, G, R).permute(2, 0, 1, 3).reshape(G, k, L * R)
                P = torch.bmm(U[:, c1 + r1 : c1 + r2, c1 + r2 :].transpose(1, 2), E)
                WT[c1 + r2 :].view(-1, L, G, R).sub_(P.view(G, -1, L, R).permute(1, 2, 0, 3))

    def _steps(self, W1, c1: int, r1: int, r2: int, rmT, E1, inv_d) -> None:
        """The rank-1 steps of columns r1 .. r2 - 1 of the block W1 (its columns from c1 on),
        one column at a time (N:M picks a group's entries as its first column is reached)."""
        U1, dU2, valid, n, m, G, R = self.U, self.dU2, self.valid, self.n, self.m, self.G, self.R
        U1 = U1[..., c1 : c1 + W1.shape[0], c1 : c1 + W1.shape[0]]
        L = W1.shape[1] // valid.shape[0]
        for j in range(r1, r2):
            if n is not None and j % m == 0:
                # N:M picks use the weights as updated by the columns already swept.
                g, cols = slice(j, j + m), slice(c1 + j, c1 + j + m)
                s = (W1[g].T ** 2 / dU2[..., cols]).masked_fill(rmT[g].T, -1.0)
                pick = torch.zeros_like(s, dtype=torch.bool)
                pick.scatter_(1, torch.topk(s, n, dim=1, largest=False).indices, True)
                rmT[g] |= pick.T & valid[:, cols].T
                E1[g] = rmT[g].to(W1.dtype) * inv_d[cols]
            err = E1[j].mul_(W1[j])
            if G == 1:
                W1[j:r2].addr_(U1[j, j:r2], err, alpha=-1.0)
            else:  # row group g moves along its own factor's row j
                coef = U1[:, j, j:r2].T[:, None, :, None]
                W1[j:r2].view(r2 - j, L, G, R).addcmul_(coef, err.view(1, L, G, R), value=-1.0)
