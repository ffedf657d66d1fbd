"""CAP: Correlation-Aware Pruning for Highly-Accurate Sparse Vision Models.

Paper: Kuznedelev, Kurtic, Frantar, Alistarh, https://arxiv.org/abs/2210.09223
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.errors import NumericalError
from sparseml.fields import Field, FieldValueError, as_int, as_str, optional
from sparseml.kernels.cap import (
    cap_eliminate,
    cap_nm_prune,
    cap_reconstruct,
    prefix_counts,
    prefix_mask,
)
from sparseml.kernels.fisher import (
    accumulate_block_gram,
    from_blocks,
    invert_block_fisher,
    mspace_block_inverse,
    num_blocks,
    to_blocks,
)
from sparseml.masks import create_masks
from sparseml.modifiers.second_order import SecondOrderPruningModifier
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)
T = TypeVar("T")


def _blocks_in_parallel(value: Any) -> int:
    x = as_int(-1)(value)
    if x == 0:
        raise FieldValueError("must be -1 (automatic) or a number of blocks >= 1")
    return x


def _on_all_ranks(fn: Callable[[], T]) -> T:
    """``fn()``, failing on every rank if it fails on one (not a hang at the next collective)."""
    error = None
    try:
        result = fn()
    except Exception as err:  # re-raised below, after the other ranks learnt about it
        error = err
    failed = dist.all_reduce_sum_(torch.tensor([float(error is not None)]))
    if error is not None:
        raise error
    if failed.item() > 0:
        raise NumericalError("CAPruningModifier failed on another rank; nothing was written")
    return result


class _Part:
    """This rank's share of one parameter: blocks [b0, b1) = flat coordinates [c0, c1)."""

    def __init__(self, index: int, b0: int, b1: int, c0: int, c1: int) -> None:
        self.index, self.b0, self.b1, self.c0, self.c1 = index, b0, b1, c0, c1


@register_modifier
class CAPruningModifier(SecondOrderPruningModifier):
    """Gradual or one-shot CAP pruning: correlation-aware greedy OBS inside Fisher blocks.

    Per pruning step (and recomputation), the block-diagonal inverse empirical Fisher
    H_b = (damp*I + (1/m) sum g_b g_b^T)^-1 of every parameter (blocks of B consecutive
    flattened weights, the last one zero-padded) drives a greedy elimination in each block:
    remove the weight with the smallest w_j^2 / H_jj, apply the OBS update to the others,
    downdate H, repeat. The cumulative loss of each removal is its score; one threshold (global
    by default) over all scores picks a prefix of every block's elimination order, and the kept
    weights become the joint OBS solution for the removed set. Only the order and the losses are
    stored (6 bytes per weight) instead of the reference's (B+1) weight traces. ``mask_type``
    "N:M" runs the same greedy restricted to groups that still need removals.

    Sample recipe::

        !CAPruningModifier
          params: ["re:.*(qkv|proj|fc1|fc2).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.5
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 4096
          fisher_block_size: 192
          damp: 1.0e-8
          num_recomputations: 1
          blocks_in_parallel: -1

    | field | paper | meaning |
    |---|---|---|
    | num_grads | m | gradient samples per Fisher estimate |
    | damp | lambda | absolute dampening: F = lambda*I + (1/m) G^T G |
    | fisher_block_size | B | consecutive flattened weights per Fisher block |
    | num_recomputations | - | Fisher rebuilds between the current and the target sparsity |
    | blocks_in_parallel | - | Fisher blocks per float64 working batch (-1: about 4 MiB) |
    | mask_type | - | unstructured, or "N:M" (N pruned per M consecutive weights, B % M == 0) |
    | traces_backup_dir | - | accepted for reference recipes; unused (no traces are kept) |

    Blocks live on ``fisher_inv_device`` (else on their parameter's device); with m < B the
    inverse is built in the sample space. Under torch.distributed the blocks are split over
    the ranks and scores, weights and masks are gathered, so every rank ends identical.
    """

    FIELDS = {
        "blocks_in_parallel": Field(-1, _blocks_in_parallel, "blocks per working batch"),
        "traces_backup_dir": Field(None, optional(as_str), "accepted; unused (no traces)"),
    }

    def validate(self) -> None:
        super().validate()
        if self.mask_spec.kind == "block":
            raise self.field_error("mask_type", 'must be unstructured or "N:M" for CAP')

    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        super().on_initialize(module, **kwargs)
        if self.traces_backup_dir is not None:
            LOG.warning("CAPruningModifier keeps no weight traces: traces_backup_dir is unused")

    # ----- layout and Fisher ------------------------------------------------------------------
    def _parts(self) -> tuple[list[_Part], int]:
        """This rank's contiguous share of the blocks of all parameters, and the block count."""
        bsz = self.fisher_block_size
        sizes = [r.param.numel() for r in self.refs]
        counts = [num_blocks(n, bsz) for n in sizes]
        lo, hi = dist.shard_bounds(sum(counts))
        parts, offset = [], 0
        for i, (n, count) in enumerate(zip(sizes, counts)):
            b0, b1 = max(lo - offset, 0), min(hi - offset, count)
            if b0 < b1:
                parts.append(_Part(i, b0, b1, b0 * bsz, min(b1 * bsz, n)))
            offset += count
        return parts, sum(counts)

    def _gather(self, local: list[Tensor], parts: list[_Part], total: int) -> list[Tensor]:
        """Per-parameter full (numel,) float32 vectors from each rank's (c1 - c0,) pieces."""
        bsz = self.fisher_block_size
        device = self.refs[0].param.device
        rows = torch.zeros(sum(p.b1 - p.b0 for p in parts), bsz, device=device)
        start = 0
        for p, x in zip(parts, local):
            rows[start : start + p.b1 - p.b0].view(-1)[: p.c1 - p.c0] = x.to(device, torch.float)
            start += p.b1 - p.b0
        full = dist.all_gather_shards(rows, total).reshape(-1)
        out, offset = [], 0
        for r in self.refs:
            out.append(full[offset : offset + r.param.numel()])
            offset += num_blocks(r.param.numel(), bsz) * bsz
        return out

    def _build_fisher(self, module: nn.Module, parts: list[_Part]) -> list[Tensor]:
        """H (b1 - b0, B, B) float32 for each of this rank's parts."""
        bsz, m = self.fisher_block_size, self.num_grads
        mspace = m < bsz  # the B x B Gram would be rank-deficient: use the sample space
        store = []
        for p in parts:
            device = self.fisher_device(self.refs[p.index].param)
            shape = (m, p.c1 - p.c0) if mspace else (p.b1 - p.b0, bsz, bsz)
            store.append(torch.zeros(shape, device=device))
        row = 0
        for chunk in self.gradient_chunks(module):
            for p, buf in zip(parts, store):
                grads = chunk[p.index][:, p.c0 : p.c1]
                if mspace:
                    buf[row : row + grads.shape[0]] = grads.to(buf.device)
                else:
                    accumulate_block_gram(grads, bsz, out=buf)
            row += chunk[0].shape[0]
        if mspace:
            return _on_all_ranks(lambda: [mspace_block_inverse(g, bsz, self.damp) for g in store])
        return _on_all_ranks(lambda: [invert_block_fisher(g, m, self.damp) for g in store])

    def _blocks(self, p: _Part, H: Tensor, flat: Tensor, keep: Tensor):
        """(W, pruned, valid) of part ``p`` as (n, B) blocks on H's device."""
        bsz, sl = self.fisher_block_size, slice(p.c0, p.c1)
        W = to_blocks(flat[sl].to(H.device, torch.float32), bsz)
        pruned = to_blocks((~keep[sl]).to(H.device, torch.float32), bsz) > 0
        valid = to_blocks(torch.ones(p.c1 - p.c0, device=H.device), bsz) > 0
        return W, pruned, valid

    # ----- pruning step -----------------------------------------------------------------------
    def prune_step(self, module: nn.Module, targets: list[float]) -> None:
        if not self.refs:
            return
        parts, total = self._parts()
        inverses = self.cached("fisher", lambda: self._build_fisher(module, parts))
        flat = self.flat_weights()
        keep = [m.reshape(-1) for m in self.masks]
        bpb = None if self.blocks_in_parallel < 0 else self.blocks_in_parallel
        blocks = [self._blocks(p, H, flat[p.index], keep[p.index]) for p, H in zip(parts, inverses)]
        with torch.no_grad():
            if self.mask_spec.kind == "nm":
                new = _on_all_ranks(lambda: self._nm_local(blocks, inverses, bpb))
            else:
                new = self._unstructured(parts, total, blocks, inverses, targets, bpb)
        new_w = self._gather(
            [from_blocks(w, p.c1 - p.c0) for (w, _), p in zip(new, parts)], parts, total
        )
        new_k = self._gather(
            [from_blocks(k.float(), p.c1 - p.c0) for (_, k), p in zip(new, parts)], parts, total
        )
        for i, w in enumerate(new_w):
            self.write_weights(i, w)
        self.set_masks([k.view(r.param.shape) > 0.5 for k, r in zip(new_k, self.refs)])

    def _nm_local(self, blocks, inverses, bpb) -> list[tuple[Tensor, Tensor]]:
        spec = self.mask_spec
        return [
            cap_nm_prune(W, H, pruned, spec.n, spec.group, valid=valid, blocks_per_batch=bpb)
            for (W, pruned, valid), H in zip(blocks, inverses)
        ]

    def _unstructured(self, parts, total, blocks, inverses, targets, bpb):
        def eliminate() -> list[tuple[Tensor, Tensor]]:
            return [
                cap_eliminate(W, H, pruned, valid=valid, blocks_per_batch=bpb)
                for (W, pruned, valid), H in zip(blocks, inverses)
            ]

        # The order depends on weights, masks and H only: a sparsity sweep reuses it.
        elims = self.cached("elimination", lambda: _on_all_ranks(eliminate))
        local = [from_blocks(losses, p.c1 - p.c0) for (_, losses), p in zip(elims, parts)]
        scores = [s.view_as(r.param) for s, r in zip(self._gather(local, parts, total), self.refs)]
        masks = create_masks(
            self.masked_scores(scores), targets, self.mask_spec, self.global_sparsity
        )

        def reconstruct() -> list[tuple[Tensor, Tensor]]:
            out = []
            for p, (W, _, valid), H, (order, _) in zip(parts, blocks, inverses, elims):
                prune = to_blocks((~masks[p.index].reshape(-1)[p.c0 : p.c1]).float(), W.shape[1])
                # Counts per block keep the selection's totals; ties resolve along the order.
                counts = prefix_counts(order, prune.to(W.device) > 0, valid)
                W_new = cap_reconstruct(W, H, order, counts, blocks_per_batch=bpb)
                out.append((W_new, prefix_mask(order, counts, valid)))
            return out

        return _on_all_ranks(reconstruct)
