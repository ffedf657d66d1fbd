"""CAP: Correlation-Aware Pruning for Highly-Accurate Sparse Vision Models.

Paper: Kuznedelev, Kurtic, Frantar, Alistarh, https://arxiv.org/abs/2210.09223
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from sparseml.fields import Field, FieldValueError, as_int, as_str, optional
from sparseml.kernels.cap import (
    cap_eliminate,
    cap_nm_prune,
    cap_reconstruct,
    prefix_counts,
    prefix_mask,
)
from sparseml.kernels.fisher import from_blocks, to_blocks
from sparseml.masks import create_masks
from sparseml.modifiers.block_fisher import (
    BlockLayout,
    BlockPart,
    build_block_inverses,
    on_all_ranks,
)
from sparseml.modifiers.second_order import SecondOrderPruningModifier
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)
T = TypeVar("T")


def _blocks_in_parallel(value: Any) -> int:
    x = as_int(-1)(value)
    if x == 0:
        raise FieldValueError("must be -1 (automatic) or a number of blocks >= 1")
    return x


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

    # ----- blocks --------------------------------------------------------------------------
    def _blocks(self, p: BlockPart, H: Tensor, flat: Tensor, keep: Tensor):
        """(W, pruned, valid) of part ``p`` as (n, B) blocks on H's device."""
        bsz, sl = self.fisher_block_size, slice(p.c0, p.c1)
        W = to_blocks(flat[sl].to(H.device), bsz)  # work dtype (float32 or float64)
        pruned = to_blocks((~keep[sl]).to(H.device, torch.float32), bsz) > 0
        valid = to_blocks(torch.ones(p.c1 - p.c0, device=H.device), bsz) > 0
        return W, pruned, valid

    # ----- pruning step -----------------------------------------------------------------------
    def prune_step(self, module: nn.Module, targets: list[float]) -> None:
        if not self.refs:
            return
        layout = BlockLayout([r.param.numel() for r in self.refs], self.fisher_block_size)
        parts, owner = layout.parts, type(self).__name__
        inverses = self.cached("fisher", lambda: build_block_inverses(self, module, layout))
        flat = self.flat_weights()
        keep = [m.reshape(-1) for m in self.masks]
        bpb = None if self.blocks_in_parallel < 0 else self.blocks_in_parallel
        blocks = [self._blocks(p, H, flat[p.index], keep[p.index]) for p, H in zip(parts, inverses)]
        with torch.no_grad():
            if self.mask_spec.kind == "nm":
                new = on_all_ranks(lambda: self._nm_local(blocks, inverses, bpb), owner)
            else:
                new = self._unstructured(layout, blocks, inverses, targets, bpb)
        device = self.refs[0].param.device
        new_w = layout.gather(
            [from_blocks(w, p.c1 - p.c0) for (w, _), p in zip(new, parts)], device, flat[0].dtype
        )
        new_k = layout.gather(
            [from_blocks(k.float(), p.c1 - p.c0) for (_, k), p in zip(new, parts)], device
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

    def _unstructured(self, layout: BlockLayout, blocks, inverses, targets, bpb):
        parts, owner = layout.parts, type(self).__name__

        def eliminate() -> list[tuple[Tensor, Tensor]]:
            return [
                cap_eliminate(W, H, pruned, valid=valid, blocks_per_batch=bpb)
                for (W, pruned, valid), H in zip(blocks, inverses)
            ]

        # The order depends on weights, masks and H only: a sparsity sweep reuses it.
        elims = self.cached("elimination", lambda: on_all_ranks(eliminate, owner))
        local = [from_blocks(losses, p.c1 - p.c0) for (_, losses), p in zip(elims, parts)]
        device = self.refs[0].param.device
        scores = [s.view_as(r.param) for s, r in zip(layout.gather(local, device), self.refs)]
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

        return on_all_ranks(reconstruct, owner)
