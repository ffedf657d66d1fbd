"""CAP's weights for any prefix of its elimination order, and the masks of those prefixes.

`sparseml.kernels.cap.cap_eliminate` keeps only each block's elimination order and losses;
these turn a selection over the losses into per-block prefix lengths, the keep-mask of those
prefixes, and the weights after removing them jointly (the closed form of the replayed greedy).
Shapes as in `sparseml.kernels.cap`.
"""

from __future__ import annotations

import torch

from sparseml.errors import NumericalError
from sparseml.kernels import native, native_solve
from sparseml.kernels.chunking import for_each_chunk
from sparseml.kernels.packed import SymBlocks

# Default working set per batch: 1/24 of the float64 [H | w] of all the call's blocks, between
# 12 and 48 MiB (~42 to ~170 blocks at B = 192). Every greedy step costs ~15 small ops whatever
# the batch holds, so big batches amortise them (786,432 weights on 2 quiet cores: 12 MiB
# batches 3.8-4.5 s, 48 MiB 2.6-3.0 s); but the workspace (2.2 such batches per thread) must
# stay small next to the packed blocks of a small layer (196,608 weights: peak 1.38x the
# float32 blocks + a gradient chunk with 16 MiB batches, 1.29x with 12 MiB). On CPU a worker
# thread per core runs its own batch, single-threaded (`for_each_chunk`).
_CHUNK_BYTES = 12 * 2**20
_CHUNK_BYTES_MAX = 48 * 2**20
# On an accelerator every op is a kernel launch: batches as large as 512 MiB allow.
_CHUNK_BYTES_ACCELERATOR = 512 * 2**20


def _batches(n_b: int, B: int, blocks_per_batch: int | None, device="cpu") -> int:
    if blocks_per_batch is None:  # at least one batch per intra-op thread (see for_each_chunk)
        if torch.device(device).type != "cpu":
            return max(1, min(n_b, _CHUNK_BYTES_ACCELERATOR // (8 * B * B)))
        share = -(-n_b // max(1, torch.get_num_threads()))
        budget = min(_CHUNK_BYTES_MAX, max(_CHUNK_BYTES, n_b * B * (B + 1) * 8 // 24))
        return max(1, min(share, budget // (8 * B * B)))
    if blocks_per_batch < 1:
        raise ValueError(f"blocks_per_batch must be >= 1 or None, got {blocks_per_batch}")
    return blocks_per_batch


def recon_batch(per: int, sparsity: float) -> int:
    """Blocks per reconstruction batch when the elimination's batch holds ``per``: a batch
    holds 1.5 + 3.4 s^2 float64 (nb, B, B) arrays at a fraction s removed (H's rows, H_SS, its
    factor and index; measured), against the elimination's 2.2, so both peak about the same
    and low sparsities take larger batches (the unpacking and LAPACK calls are per batch)."""
    return max(1, int(per * 2.2 / (1.5 + 3.4 * sparsity**2)))


def _check(W: torch.Tensor, H: torch.Tensor, per_coord: torch.Tensor) -> None:
    n_b, B = W.shape
    if H.shape != (n_b, B, B) or per_coord.shape != (n_b, B):
        raise ValueError(
            f"expected W (n_b, B), H (n_b, B, B) and a (n_b, B) mask/order; got W "
            f"{tuple(W.shape)}, H {tuple(H.shape)}, mask/order {tuple(per_coord.shape)}"
        )
    if not torch.isfinite(W).all():
        raise NumericalError("CAP received NaN/Inf weights")


def cap_reconstruct(
    W: torch.Tensor,
    H: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    *,
    blocks_per_batch: int | None = None,
) -> torch.Tensor:
    """Weights after jointly removing the first ``counts[b]`` coordinates of each block's order.

    W (n_b, B), H (n_b, B, B), order (n_b, B) from :func:`cap_eliminate`, counts (n_b,) int.
    Closed form of the replayed greedy: with S = order[b, :k], w - H[:, S] y where
    H_SS y = w_S, then w_S = 0 exactly. Blocks are sorted by k and solved in batches with a
    Cholesky of H_SS padded by the identity (LU fallback). Returns W_new (n_b, B) in W's dtype.
    """
    _check(W, H, order)
    n_b, B = W.shape
    counts = counts.to(device=W.device, dtype=torch.long)
    if counts.shape != (n_b,) or bool((counts < 0).any() | (counts > B).any()):
        raise ValueError(f"counts must have shape ({n_b},) with values in [0, {B}]")
    per = _batches(n_b, B, blocks_per_batch, W.device)
    s_max = float(counts.max()) / B if n_b else 0.0
    bs = per if blocks_per_batch else recon_batch(per, s_max)
    W_new = W.clone()
    perm = torch.argsort(counts, descending=True, stable=True)
    perm = perm[counts[perm] > 0]
    if native.ENABLED and isinstance(H, SymBlocks) and W.device.type == "cpu":
        perm = _reconstruct_compiled(W, H, order, counts, perm, W_new)  # what it could not solve

    def batch(i: int) -> None:
        bi = perm[i : i + bs]
        k = counts[bi]
        kmax = int(k[0])
        S = order[bi, :kmax].long()
        Hb = H[bi].double()
        flat = (S.unsqueeze(2) * B + S.unsqueeze(1)).flatten(1)
        hss = Hb.flatten(1).gather(1, flat).view(-1, kmax, kmax)  # H_SS
        act = torch.arange(kmax, device=W.device) < k.unsqueeze(1)
        # Pad H_SS with the identity beyond each block's own k (the right-hand side is 0 there).
        M = hss.masked_fill_(~(act.unsqueeze(2) & act.unsqueeze(1)), 0.0)
        M.diagonal(dim1=1, dim2=2).add_(~act)
        w = W[bi].double()
        rhs = (w.gather(1, S) * act).unsqueeze(2)
        L, info = torch.linalg.cholesky_ex(M)
        y = torch.cholesky_solve(rhs, L)
        bad = info > 0
        if bad.any():  # rounding made some H_SS indefinite: LU still solves it
            y[bad] = torch.linalg.solve_ex(M[bad], rhs[bad])[0]
        # H[:, S] y = H y_full with y_full zero outside S: one matvec, no H[:, S] copy.
        y_full = torch.zeros_like(w).scatter_(1, S, y.squeeze(2))
        w = w - (Hb @ y_full.unsqueeze(2)).squeeze(2)
        w.scatter_(1, S, w.gather(1, S) * ~act)
        if not torch.isfinite(w).all():
            raise NumericalError("CAP reconstruction produced NaN/Inf: H_SS is singular")
        W_new[bi] = w.to(W.dtype)

    for_each_chunk(batch, perm.numel(), bs, W.device)
    return W_new


def cap_prefix_weights(
    W: torch.Tensor,
    H: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    replay: torch.Tensor,
    pre: torch.Tensor,
    *,
    blocks_per_batch: int | None = None,
) -> torch.Tensor:
    """`cap_reconstruct` after `sparseml.kernels.cap.cap_eliminate_factored`: the blocks of
    ``replay`` (their rows of H hold the elimination's factors; ``pre`` (n_b, B) bool, the
    coordinates removed before it) are replayed (`native_solve.replay_packed`), the others
    solved from H. Returns W_new (n_b, B) in W's dtype."""
    counts = counts.to(device=W.device, dtype=torch.long)
    replay, pre = replay.to(W.device), pre.to(W.device)
    if pre.shape != W.shape or replay.shape != W.shape[:1]:
        raise ValueError(f"pre must be {tuple(W.shape)} and replay ({W.shape[0]},) bool")
    # the replay starts after the coordinates removed before the elimination: they must lead
    # each order (as `cap_eliminate_factored` put them) and be counted
    first = pre.sum(1)
    lead = pre.gather(1, order.long()) == (
        torch.arange(W.shape[1], device=W.device) < first[:, None]
    )
    if bool((replay & ~(lead.all(1) & (counts >= first))).any()):
        raise ValueError("pre is not the removed set that leads the order of a replayed block")
    W_new = cap_reconstruct(
        W, H, order, counts.masked_fill(replay, 0), blocks_per_batch=blocks_per_batch
    )
    rows = replay.nonzero().squeeze(1)
    if rows.numel():
        W64 = W.to(torch.float64)
        out = native_solve.replay_packed(W64, H, order, pre, counts, rows)[rows]
        if not torch.isfinite(out).all():
            raise NumericalError("CAP reconstruction produced NaN/Inf")
        W_new[rows] = out.to(W.dtype)
    return W_new


def _reconstruct_compiled(W, H: SymBlocks, order, counts, perm, W_new) -> torch.Tensor:
    """`cap_reconstruct` of blocks ``perm`` by the compiled kernel (one block at a time, no
    batch arrays), into W_new; returns the blocks whose H_SS Cholesky failed (for the LU
    fallback of the batched path)."""
    w = W.to(torch.float64).contiguous()
    _, hy, info = native_solve.solve_subsets_packed(w, H, order.long(), counts, perm)
    done = perm[info[perm] == 0]
    new = w[done] - hy[done]
    first = torch.arange(w.shape[1]) < counts[done].unsqueeze(1)
    new.scatter_(1, order[done].long(), new.gather(1, order[done].long()) * ~first)
    if not torch.isfinite(new).all():
        raise NumericalError("CAP reconstruction produced NaN/Inf: H_SS is singular")
    W_new[done] = new.to(W.dtype)
    return perm[info[perm] != 0]


def prefix_counts(order: torch.Tensor, prune: torch.Tensor, valid: torch.Tensor | None = None):
    """Per-block prefix lengths (n_b,) int64 of a pruning decision ``prune`` (n_b, B) bool.

    A threshold on the cumulative losses selects a prefix of every block's order except among
    coordinates tied at the threshold value; only the count per block is kept, and the matching
    mask is :func:`prefix_mask`: inside a block, tied coordinates are taken in elimination order
    (equal cumulative loss means the later ones add nothing), so the number pruned per block, the
    total count and the loss are those of ``prune`` and the weights from :func:`cap_reconstruct`
    always agree with the mask. Padded coordinates (valid False) are counted: they lead the order.
    """
    if order.shape != prune.shape:
        raise ValueError(f"order {tuple(order.shape)} and prune {tuple(prune.shape)} differ")
    removed = prune.bool() if valid is None else prune.bool() | ~valid.bool()
    return removed.sum(1)


def prefix_mask(
    order: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask (n_b, B) bool, False on the first ``counts[b]`` coordinates of each order.

    Padded coordinates (valid False) are reported as kept so they never count as pruned.
    """
    n_b, B = order.shape
    first = torch.arange(B, device=order.device) < counts.to(order.device).unsqueeze(1)
    mask = torch.ones((n_b, B), dtype=torch.bool, device=order.device)
    mask.scatter_(1, order.long(), ~first)
    return mask if valid is None else mask | ~valid.bool()
