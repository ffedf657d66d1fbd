"""Scores and weight updates of the score -> select -> update methods, in their two shapes.

*Part-wise* (block Fisher, per-layer estimates): every rank scores and updates its own parts
of the layout (`sparseml.layouts`), and ``gather`` reassembles full per-parameter vectors, so
all ranks end with the same masks and weights. A method gives ``part_scores(part, w, est,
pruned)`` and optionally ``part_update(part, w, est, kept, new)``, which returns the part's new
weights, or (weights, keep) when it decides the kept set itself (CAP's prefixes).

*Matrix-free* (M-FAC, full WoodFisher and WoodTaylor): the inverse over the unpruned weights of
an `UnprunedLayout` (``diag()``, ``mul(x)``) and an optional shift h (WoodTaylor's H g_bar); with
u = w - h, the scores are u_q^2 / (2 H_qq) and the unpruned weights move by
delta = -h - H x, x_q = u_q / H_qq on the weights removed now (the sum of the single-weight
corrections); ``scale`` multiplies all of delta (0: scores only).

Every local computation runs under `on_all_ranks`, so a failure on one rank fails all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparseml import dist
from sparseml.dist import on_all_ranks
from sparseml.layouts import UnprunedLayout


@dataclass
class Scored:
    """Scores (one tensor per parameter, its shape; higher = keep), what the update of the
    same step reuses (the weights as scored) and, when the method derived it from the estimate
    (WoodTaylor's shift), the estimate to update with."""

    scores: list[Tensor]
    context: Any = None
    estimate: Any = None


# ----- part-wise -----------------------------------------------------------------------------------
def unscored(pruner, layout) -> Scored:
    """No scores, only this rank's weights and keep-masks per part (a joint method's input)."""
    weights = layout.take(pruner.flat_weights())
    kept = layout.take([m.reshape(-1) for m in pruner.masks])
    return Scored([], (weights, kept))


@torch.no_grad()
def part_scores(pruner, layout, estimates: list[Any], score) -> Scored:
    """``score(part, w, est, pruned)`` over this rank's parts, gathered to every rank."""
    owner, parts = type(pruner).__name__, layout.parts
    device, dtype = pruner.refs[0].param.device, pruner.work_dtype
    weights, kept = unscored(pruner, layout).context

    def local() -> list[Tensor]:
        return [score(p, w, e, ~k) for p, w, e, k in zip(parts, weights, estimates, kept)]

    gathered = layout.gather(on_all_ranks(local, owner), device, dtype)
    scores = [s.view_as(r.param) for s, r in zip(gathered, pruner.refs)]
    return Scored(scores, (weights, kept))


def _finish(w: Tensor, update: Tensor | None, keep: Tensor, scale: float) -> Tensor:
    """The part's written weights: ``scale`` of the update's change, zeros off ``keep``."""
    if update is None or scale == 0.0:
        out = w
    elif scale == 1.0:
        out = update.to(w.device, w.dtype)
    else:
        out = w + scale * (update.to(w.device, w.dtype) - w)
    return out.masked_fill(~keep, 0.0)


@torch.no_grad()
def part_updates(
    pruner, layout, estimates: list[Any], scored: Scored, masks: list[Tensor], update, scale: float
) -> list[Tensor]:
    """Write ``update(part, w, est, kept, new)`` (None: zeros only) for the chosen ``masks``;
    returns the masks kept in the end."""
    owner, parts = type(pruner).__name__, layout.parts
    device, dtype = pruner.refs[0].param.device, pruner.work_dtype
    weights, kept = scored.context
    chosen = layout.take([m.reshape(-1) for m in masks])

    def local() -> tuple[list[Tensor], list[Tensor]]:
        new_w, new_k = [], []
        for p, w, e, k, c in zip(parts, weights, estimates, kept, chosen):
            keep = k & c.to(k.device)
            result = None if update is None else update(p, w, e, k, k & ~keep)
            if isinstance(result, tuple):
                result, keep = result[0], result[1].to(k.device) & k
            new_w.append(_finish(w, result, keep.to(w.device), scale))
            new_k.append(keep.float())
        return new_w, new_k

    new_w, new_k = on_all_ranks(local, owner)
    for i, flat in enumerate(layout.gather(new_w, device, dtype)):
        pruner.write_weights(i, flat)
    keeps = layout.gather(new_k, device)
    return [k.view(r.param.shape) > 0.5 for k, r in zip(keeps, pruner.refs)]


# ----- matrix-free --------------------------------------------------------------------------------
def gather_layout(local: Tensor, layout: UnprunedLayout, block_size: int | None) -> Tensor:
    """Full-layout vector from this rank's columns (blocks) or rank 0's copy (full inverse:
    every rank builds the same one; rank 0's makes the results bitwise equal everywhere)."""
    if not dist.is_distributed():
        return local
    if block_size is None:
        return dist.broadcast_(local.contiguous())
    rows = dist.all_gather_shards(local.reshape(-1, block_size), layout.total // block_size)
    return rows.reshape(-1)


@torch.no_grad()
def matrix_free_scores(pruner, est, shift: Tensor | None = None) -> Scored:
    """u^2 / (2 H_qq) on the unpruned weights, u = w - h (``shift``: this rank's h or None)."""
    layout, device, block = est.layout, est.device, est.block
    dtype = pruner.work_dtype  # never half precision: w^2 would round and near-ties flip
    weights = [w.to(device) for w in pruner.flat_weights()]
    index = [i.to(device) for i in layout.index]
    diag = gather_layout(est.inverse.diag().to(dtype), layout, block)
    diag = diag.clamp_min(torch.finfo(dtype).tiny)
    h = None if shift is None else gather_layout(shift.to(device, dtype), layout, block)
    shifted = [w[i] for w, i in zip(weights, index)]
    if h is not None:
        shifted = [u - seg for u, seg in zip(shifted, layout.segments(h))]
    scores = []  # pruned entries get -inf from the skeleton
    for ref, i, u, seg in zip(pruner.refs, index, shifted, layout.segments(diag)):
        score = torch.zeros(ref.param.numel(), device=device, dtype=dtype)
        score[i] = u.square() / (2 * seg)
        scores.append(score.view(ref.param.shape))
    return Scored(scores, (weights, index, diag, h, shifted))


@torch.no_grad()
def matrix_free_update(
    pruner, est, scored: Scored, masks: list[Tensor], scale: float, move: Tensor | None = None
) -> None:
    """Move the unpruned weights by ``scale`` * (-h - H x) for the weights ``masks`` drop;
    ``move`` (this rank's columns) replaces h in the move, not in x (WoodTaylor's
    ``normalize_hgp``)."""
    layout, device, block = est.layout, est.device, est.block
    weights, index, diag, h, shifted = scored.context
    dtype = pruner.work_dtype
    x = torch.zeros(layout.total, device=device, dtype=dtype)
    for u, i, mask, seg, x_seg in zip(
        shifted, index, masks, layout.segments(diag), layout.segments(x)
    ):
        drop = ~mask.reshape(-1).to(device)[i]
        x_seg.copy_(torch.where(drop, -u / seg, 0.0))
    lo, hi = layout.local
    delta = gather_layout(est.inverse.mul(x[lo:hi]).to(dtype), layout, block)
    if h is not None:
        delta = delta - (
            h if move is None else gather_layout(move.to(device, dtype), layout, block)
        )
    for n, (w, i, seg) in enumerate(zip(weights, index, layout.segments(delta))):
        if scale != 0.0:
            w[i] += seg if scale == 1.0 else scale * seg
        pruner.write_weights(n, w)
