"""CAP: Correlation-Aware Pruning for Highly-Accurate Sparse Vision Models.

Paper: https://arxiv.org/abs/2210.09223 (Kuznedelev, Kurtic, Frantar, Alistarh).

Per Fisher block b (B consecutive coordinates of a layer's row-major flattening) CAP removes
weights greedily: pivot p = argmin_j w_j^2 / H_jj over the remaining coordinates, then the OBS
update w -= (w_p / H_pp) H[:, p] and the Schur downdate H -= H[:, p] H[p, :] / H_pp, where H is
the block's inverse Fisher. The cumulative loss of a prefix of that order equals the joint OBS
loss 1/2 w_S^T (H_SS)^-1 w_S of removing the prefix together (an OBS identity), so instead of storing
per-step weight traces we keep only the order and the losses, and rebuild the weights for any
per-block prefix length in closed form. Shapes: n_b blocks of size B; "pruned" masks are True
where a coordinate is already removed; returned ``mask`` tensors are True where a weight is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sparseml.kernels import native, native_cap
from sparseml.kernels.cap_greedy import _LAZY, _greedy, _load
from sparseml.kernels.cap_prefix import (
    _batches,
    _check,
    cap_prefix_weights,
    cap_reconstruct,
    prefix_counts,
    prefix_mask,
    recon_batch,
)
from sparseml.kernels.chunking import for_each_chunk
from sparseml.kernels.packed import SymBlocks

__all__ = [
    "cap_eliminate",
    "cap_eliminate_factored",
    "cap_prefix_weights",
    "cap_reconstruct",
    "prefix_counts",
    "prefix_mask",
    "cap_nm_prune",
    "workspace_bytes",
]


def workspace_bytes(
    n_b: int,
    B: int,
    blocks_per_batch: int | None,
    device: torch.device | str = "cpu",
    gathered: bool = True,
    sparsity: float = 0.9,
) -> int:
    """Bytes the elimination or the reconstruction allocate at most at once for ``n_b`` blocks
    of size B, on top of their inputs (W, H) and outputs (order, losses, new weights).

    Per working batch of nb blocks: the elimination holds the float64 [H | w] (nb, B, B + 1)
    and, while compacting, its gathered part (2/3 of it), plus a gathered copy of H's rows
    when the batch is ``gathered`` rather than a contiguous slice of H (blocks of unequal work:
    padded blocks, earlier pruning). Measured in a fresh process with H packed
    (`sparseml.kernels.packed`): 2.2 such arrays per batch in flight, 2.7 when gathered. The
    lazy factors add 2 x 32 x nb x (B + 1).

    The reconstruction's batches (`sparseml.kernels.cap_prefix.recon_batch`) hold H's rows
    (nb, B, B) in float64 plus, with k = ``sparsity`` x B removed per block, H_SS, its factor
    and their index (nb, k, k): measured 1.5 + 3.4 s^2 arrays of (nb, B, B) (2.3 at 50%, 4.2
    at 90%). On CPU one batch per intra-op thread is in flight (`for_each_chunk`); there the
    compiled kernels (`sparseml.kernels.native`) need far less (see the code).
    """
    if n_b < 1:
        return 0
    nb = _batches(n_b, B, blocks_per_batch, device)
    copies = 2.7 if gathered else 2.2
    elimination = 8 * nb * (copies * B * (B + 1) + 2 * _LAZY * (B + 1))
    recon = nb if blocks_per_batch else recon_batch(nb, sparsity)
    reconstruction = 8 * (1.5 + 3.4 * sparsity**2) * recon * B * B
    batches = -(-n_b // nb)
    on_cpu = torch.device(device).type == "cpu"
    in_flight = min(torch.get_num_threads(), batches) if on_cpu else 1
    if not (native.ENABLED and on_cpu):
        return int(in_flight * max(elimination, reconstruction))
    # Compiled kernels (packed H): two B x B float64 scratch blocks per thread, the batch's
    # outputs (pivots, scores, weights and the order's keys: ~8 (nb, B) arrays), and, for the
    # reconstruction, float64 w, y, H y and their gathers over all blocks (~6 (n_b, B) arrays).
    if B <= native_cap.GREEDY_MAX_BLOCK:
        elimination = 8 * (2 * B * B + 8 * nb * (B + 1))
    reconstruction = 8 * 2 * B * B
    return int(in_flight * max(elimination, reconstruction) + 8 * 6 * n_b * B)


def _run(
    W, H, pre, steps_all, blocks_per_batch, nm=None, on_blocks=None, per_step=False, factor=None
):
    """Shared driver: batches blocks by pending work, pre-eliminates and runs the greedy.
    ``factor`` (n_b,) bool (the compiled packed path only): blocks whose rows of H become the
    elimination's factors (`cap_eliminate_factored`).

    ``on_blocks(n)`` (optional, e.g. a progress bar's update) is called after each batch with
    its number of blocks, possibly from worker threads.

    Returns order (n_b, B) int16/int64, losses (n_b, B) float32 (cumulative ones made
    non-decreasing along the order; with ``per_step`` each step's own increment), and for
    N:M the final weights (n_b, B) float64 (None otherwise).
    """
    n_b, B = W.shape
    dev = W.device
    bs = _batches(n_b, B, blocks_per_batch, dev)
    # Blocks with similar work share a batch so few steps are wasted on finished blocks.
    perm = torch.argsort(steps_all, descending=True, stable=True)
    contiguous = bool((perm == torch.arange(n_b, device=dev)).all())
    order = torch.empty((n_b, B), dtype=torch.int16 if B <= 32767 else torch.long, device=dev)
    losses = torch.empty((n_b, B), dtype=torch.float32, device=dev)
    W_new = None if nm is None else torch.empty((n_b, B), dtype=torch.float64, device=dev)
    ar = torch.arange(B, device=dev)
    packed_cpu = native.ENABLED and isinstance(H, SymBlocks) and dev.type == "cpu"
    packed_cpu = packed_cpu and B <= native_cap.GREEDY_MAX_BLOCK
    W64 = W.to(torch.float64).contiguous() if packed_cpu else None
    pre = pre.contiguous()  # the compiled greedy reads it whole
    if packed_cpu and not H.data.is_contiguous():
        H = SymBlocks(H.data.contiguous(), B)

    def batch(i: int) -> None:
        bi = perm[i : i + bs]
        nb = bi.numel()
        rows = slice(i, i + nb) if contiguous else bi
        elim, steps = pre[bi].clone(), steps_all[bi]
        gid = cnt = None
        if nm is not None:
            n, m, valid_groups = nm
            gid = (ar // m).expand(nb, B)
            cnt = torch.where(valid_groups[bi], elim.view(nb, -1, m).sum(2), n)
        if packed_cpu:  # compiled, straight from the packed triangles
            piv, cum, w = native_cap.greedy_from_packed(
                H, bi, W64, pre, steps, cnt, *(nm[:2] if nm else (0, 0)), factor
            )
        else:  # the working array is _greedy's own (no name here keeps it alive)
            piv, cum, w = _greedy(
                _load(H, rows, nb, B), W[bi], elim, steps, gid, cnt, *(nm[:2] if nm else (0, 0))
            )
        if W_new is not None:
            W_new[bi] = w
        # Order: pre-eliminated coordinates by index, the pivots, then the survivors by index.
        T = piv.shape[1]
        tgt = torch.where(piv >= 0, piv, B)
        key = torch.where(pre[bi], ar - 2 * B, ar + B)
        key = torch.cat([key, key[:, :1]], 1)
        key.scatter_(1, tgt, torch.arange(T, device=dev).expand(nb, T) - B)
        o = torch.argsort(key[:, :B], dim=1)
        loss = torch.zeros((nb, B + 1), dtype=torch.float64, device=dev)
        if per_step:  # each step's increment 1/2 s_t (finished blocks add 0)
            inc = torch.diff(cum, dim=1, prepend=cum.new_zeros(nb, 1))
            loss = loss.scatter_(1, tgt, inc)
            losses[bi] = loss[:, :B].clamp_min(0.0).float()
        else:
            loss = loss.scatter_(1, tgt, cum)[:, :B]
            in_order = loss.gather(1, o).cummax(1).values  # absorbs rounding, keeps prefixes
            losses[bi] = loss.scatter_(1, o, in_order).float()
        order[bi] = o.to(order.dtype)
        if on_blocks is not None:
            on_blocks(nb)

    if native.ENABLED and dev.type == "cpu":  # the compiled greedy calls BLAS (syrk)
        with native.single_threaded_blas():
            for_each_chunk(batch, n_b, bs, dev)
    else:
        for_each_chunk(batch, n_b, bs, dev)
    return order, losses, W_new


def cap_eliminate(
    W: torch.Tensor,
    H: torch.Tensor,
    pruned: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    blocks_per_batch: int | None = None,
    on_blocks: Callable[[int], None] | None = None,
    per_step: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy CAP elimination order and cumulative OBS losses of every Fisher block.

    W (n_b, B) block weights; H (n_b, B, B) inverse Fisher blocks (read only, never modified);
    pruned (n_b, B) bool, coordinates already removed; valid (n_b, B) bool, False on padding.
    Pruned and padded coordinates come first in ``order`` (by index) with loss 0, then the greedy
    pivots. Returns order (n_b, B) int16 (int64 if B > 32767) and losses (n_b, B) float32 where
    losses[b, order[b, t]] = 1/2 w_S^T (H_SS)^-1 w_S for S = order[b, :t + 1] (non-decreasing
    along the order). With ``per_step`` the losses are instead each step's own increment
    losses[b, order[b, t]] = 1/2 w_p^2 / H_pp at that step (not monotone): a threshold over them
    counts, per block, how many of the smallest increments fall in it, and that many
    coordinates are removed from the front of its order. Runs in float64 on a working copy of
    ``blocks_per_batch`` blocks at a time; ``on_blocks(n)`` is told of every ``n`` blocks done
    (progress; from worker threads).
    """
    _check(W, H, pruned)
    pre = pruned.bool() if valid is None else pruned.bool() | ~valid.bool()
    steps = W.shape[1] - pre.sum(1)
    order, losses, _ = _run(W, H, pre, steps, blocks_per_batch, None, on_blocks, per_step)
    return order, losses


def cap_eliminate_factored(
    W: torch.Tensor, H: torch.Tensor, pruned: torch.Tensor, **options: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cap_eliminate` (same ``options``: valid, blocks_per_batch, on_blocks, per_step) that
    keeps, in H's own storage, what rebuilding the weights needs.

    On the compiled CPU path (packed contiguous H, B <= `native_cap.GREEDY_MAX_BLOCK`) the
    packed row of every block whose already-removed coordinates hold zero weights is
    overwritten by the elimination's factors (each step's pivot and column: B (B + 1) / 2
    numbers at most, the row's size). Returns order, losses and ``replay`` (n_b,) bool, the
    blocks so overwritten; `sparseml.kernels.cap_prefix.cap_prefix_weights` rebuilds any
    prefix's weights from them in O(B k) (the greedy's own weights, bit for bit) instead of a
    k x k solve. The other rows keep H (``replay`` all False elsewhere).
    """
    unknown = set(options) - {"valid", "blocks_per_batch", "on_blocks", "per_step"}
    if unknown:
        raise TypeError(f"cap_eliminate_factored got unexpected options {sorted(unknown)}")
    _check(W, H, pruned)
    n_b, B = W.shape
    valid = options.get("valid")
    pre = pruned.bool() if valid is None else pruned.bool() | ~valid.bool()
    replay = torch.zeros(n_b, dtype=torch.bool, device=W.device)
    compiled = native.ENABLED and isinstance(H, SymBlocks) and W.device.type == "cpu"
    if compiled and B <= native_cap.GREEDY_MAX_BLOCK and H.data.is_contiguous():
        # a removed coordinate with a nonzero weight would move the others when it is
        # pre-eliminated, which the replay does not repeat
        replay = ~(pre & (W != 0)).any(1)
    steps = B - pre.sum(1)
    factor = replay if bool(replay.any()) else None
    order, losses, _ = _run(
        W, H, pre, steps, options.get("blocks_per_batch"), None, options.get("on_blocks"),
        options.get("per_step", False), factor,
    )  # fmt: skip
    return order, losses, replay


def cap_nm_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    pruned: torch.Tensor,
    n: int,
    m: int,
    *,
    valid: torch.Tensor | None = None,
    blocks_per_batch: int | None = None,
    on_blocks: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAP N:M: greedy elimination until every group of m consecutive coordinates has n removed.

    W (n_b, B), H (n_b, B, B) (read only), pruned (n_b, B) bool; n pruned per group of m, with
    B % m == 0. Groups already holding >= n removed coordinates close at once (pruned weights are
    never re-opened); padded groups (valid False) must be whole and are ignored. Returns the
    updated weights W_new (n_b, B) (W's dtype) and mask (n_b, B) bool, True = kept.
    """
    _check(W, H, pruned)
    n_b, B = W.shape
    if not (0 < n <= m) or B % m:
        raise ValueError(f"N:M needs 0 < n <= m and B % m == 0; got n={n}, m={m}, B={B}")
    pre = pruned.bool()
    valid_groups = torch.ones((n_b, B // m), dtype=torch.bool, device=W.device)
    if valid is not None:
        vg = valid.bool().view(n_b, -1, m)
        if bool((vg.any(2) != vg.all(2)).any()):
            raise ValueError("N:M groups must be either all valid or all padding")
        valid_groups = vg.all(2)
        pre = pre | ~valid.bool()
    need = (n - pre.view(n_b, -1, m).sum(2)).clamp_min(0) * valid_groups
    steps = need.sum(1)
    nm = (n, m, valid_groups)
    order, _, W_new = _run(W, H, pre, steps, blocks_per_batch, nm, on_blocks)
    mask = prefix_mask(order, pre.sum(1) + steps, valid)  # pre-eliminated, then greedy picks
    return W_new.to(W.dtype), mask
