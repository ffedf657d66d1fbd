"""CAP: Correlation-Aware Pruning for Highly-Accurate Sparse Vision Models.

Paper: Kuznedelev, Kurtic, Frantar, Alistarh, https://arxiv.org/abs/2210.09223
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from sparseml.dist import on_all_ranks
from sparseml.fields import Field, FieldValueError, as_int, as_str, optional
from sparseml.kernels.cap import (
    cap_eliminate,
    cap_nm_prune,
    cap_reconstruct,
    prefix_counts,
    prefix_mask,
)
from sparseml.kernels.fisher import from_blocks, to_blocks
from sparseml.layouts import BlockPart
from sparseml.modifiers.block_pruner import BlockPruningModifier
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)


def _blocks_in_parallel(value: Any) -> int:
    x = as_int(-1)(value)
    if x == 0:
        raise FieldValueError("must be -1 (automatic) or a number of blocks >= 1")
    return x


@register_modifier
class CAPruningModifier(BlockPruningModifier):
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

    # ----- the method -------------------------------------------------------------------------
    def estimate(self, module: nn.Module, layout) -> list[dict[str, Tensor]]:
        """Per part: H, the blocks (W, valid) and, unstructured, the elimination order and the
        cumulative losses; the order depends on weights, masks and H only (a sweep reuses it)."""
        inverses = super().estimate(module, layout)
        weights = layout.take(self.flat_weights())
        kept = layout.take([m.reshape(-1) for m in self.masks])
        bsz, bpb = self.fisher_block_size, self._per_batch()

        def eliminate() -> list[dict[str, Tensor]]:
            out = []
            for w, k, H in zip(weights, kept, inverses):
                W = to_blocks(w.to(H.device), bsz)  # work dtype (float32 or float64)
                valid = to_blocks(torch.ones(w.numel(), device=H.device), bsz) > 0
                est = {"H": H, "W": W, "valid": valid}
                if self.mask_spec.kind != "nm":
                    pruned = to_blocks((~k).to(H.device, torch.float32), bsz) > 0
                    est["order"], est["losses"] = cap_eliminate(
                        W, H, pruned, valid=valid, blocks_per_batch=bpb
                    )
                out.append(est)
            return out

        return on_all_ranks(eliminate, type(self).__name__)

    def select_masks(self, scores: list[Tensor], targets: list[float]) -> list[Tensor]:
        if self.mask_spec.kind == "nm":  # which N of each group go is decided in part_update
            return self.masks
        return super().select_masks(scores, targets)

    def part_scores(self, part: BlockPart, w: Tensor, est: dict, pruned: Tensor) -> Tensor:
        if self.mask_spec.kind == "nm":
            return torch.zeros_like(w)
        return from_blocks(est["losses"], w.numel())

    def part_update(
        self, part: BlockPart, w: Tensor, est: dict, kept: Tensor, new: Tensor
    ) -> tuple[Tensor, Tensor]:
        W, H, valid, bpb = est["W"], est["H"], est["valid"], self._per_batch()
        if self.mask_spec.kind == "nm":
            pruned = to_blocks((~kept).to(H.device, torch.float32), W.shape[1]) > 0
            spec = self.mask_spec
            W_new, keep = cap_nm_prune(
                W, H, pruned, spec.n, spec.group, valid=valid, blocks_per_batch=bpb
            )
        else:
            prune = to_blocks((~kept | new).to(H.device, torch.float32), W.shape[1]) > 0
            # Counts per block keep the selection's totals; ties resolve along the order.
            counts = prefix_counts(est["order"], prune, valid)
            W_new = cap_reconstruct(W, H, est["order"], counts, blocks_per_batch=bpb)
            keep = prefix_mask(est["order"], counts, valid)
        return from_blocks(W_new, w.numel()), from_blocks(keep, w.numel()) > 0

    def _per_batch(self) -> int | None:
        return None if self.blocks_in_parallel < 0 else self.blocks_in_parallel
