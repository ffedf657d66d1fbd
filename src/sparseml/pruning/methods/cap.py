"""CAP: Correlation-Aware Pruning for Highly-Accurate Sparse Vision Models.

Paper: Kuznedelev, Kurtic, Frantar, Alistarh, https://arxiv.org/abs/2210.09223
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from sparseml.fields import Field, FieldValueError, as_int, as_str, one_of, optional
from sparseml.kernels.cap import cap_nm_prune, cap_prefix_weights, prefix_counts, prefix_mask
from sparseml.kernels.fisher import from_blocks, to_blocks
from sparseml.layouts import BlockPart
from sparseml.pruning.estimators import CAPElimination
from sparseml.pruning.fields import BLOCKS, SAMPLING, SAMPLING_CHECKS
from sparseml.pruning.flops_plan import FLOPS, FLOPS_CHECKS
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.updates import Scored, part_scores, part_updates, unscored
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)


def _blocks_in_parallel(value: Any) -> int:
    x = as_int(-1)(value)
    if x == 0:
        raise FieldValueError("must be -1 (automatic) or a number of blocks >= 1")
    return x


@register_modifier
class CAPruningModifier(PruningModifier):
    """Gradual or one-shot CAP pruning: correlation-aware greedy OBS inside Fisher blocks.

    Per pruning step (and recomputation), the block-diagonal inverse empirical Fisher
    H_b = (damp*I + (1/m) sum g_b g_b^T)^-1 of every parameter (blocks of B consecutive
    flattened weights, the last one zero-padded) drives a greedy elimination in each block:
    remove the weight with the smallest w_j^2 / H_jj, apply the OBS update to the others,
    downdate H, repeat. The cumulative loss of each removal is its score; one threshold (global
    by default) over all scores picks a prefix of every block's elimination order, and the kept
    weights become the joint OBS solution for the removed set. Only the order and the losses are
    stored (7 bytes per weight, with the removed set) instead of the reference's (B+1) weight traces. ``mask_type``
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
    | blocks_in_parallel | - | Fisher blocks per float64 working batch (-1: about 12 MiB) |
    | mask_type | - | unstructured, or "N:M" (N pruned per M consecutive weights, B % M == 0) |
    | flops_power, flops_target | - | FLOPs-aware scores / a MACs target (`flops_plan`) |
    | loss_ranking | - | "per_step" (default: each elimination's own increment; per block, |
    |  |  | as many removed as its increments fall under the threshold) or "cumulative" |
    |  |  | (the reference: a prefix's joint OBS loss); per_step won the held-out choice on |
    |  |  | both models of the Fashion-MNIST benchmark (docs/benchmarks.md) |
    | traces_backup_dir | - | accepted for reference recipes; unused (no traces are kept) |

    Estimator: `CAPElimination` (block inverses, the elimination order and its losses);
    selectors: global, per layer, a MACs target (scores = cumulative losses), N:M (joint
    greedy). Under
    torch.distributed the blocks are split over the ranks and scores, weights and masks are
    gathered, so every rank ends identical.
    """

    FIELDS = {
        **SAMPLING,
        **BLOCKS,
        **FLOPS,
        "blocks_in_parallel": Field(-1, _blocks_in_parallel, "blocks per working batch"),
        "traces_backup_dir": Field(None, optional(as_str), "accepted; unused (no traces)"),
        "loss_ranking": Field(
            "per_step",
            one_of("cumulative", "per_step"),
            "scores: each step's own increment, or each prefix's joint loss (reference)",
        ),
    }
    CHECKS = (*SAMPLING_CHECKS, *FLOPS_CHECKS)
    SELECTORS = frozenset({"global", "layer", "nm", "flops"})

    def setup(self, module: nn.Module) -> None:
        if self.traces_backup_dir is not None:
            LOG.warning("CAPruningModifier keeps no weight traces: traces_backup_dir is unused")

    def estimator(self) -> CAPElimination:
        nm = self.mask_spec.kind == "nm"
        per_step = self.loss_ranking == "per_step"
        return CAPElimination(self.fisher_block_size, self.damp, nm, self._per_batch(), per_step)

    @property
    def joint(self) -> bool:
        return self.mask_spec.kind == "nm"

    def score(self, estimate: list[dict]) -> Scored:
        losses = lambda part, w, est, pruned: from_blocks(est["losses"], w.numel())  # noqa: E731
        return part_scores(self, self.step_layout, estimate, losses)

    def update_weights(self, estimate: list[dict], scored: Scored, masks: list[Tensor]):
        return part_updates(self, self.step_layout, estimate, scored, masks, self._prefix, 1.0)

    def select_and_update(self, estimate: list[dict], targets: list[float]) -> list[Tensor]:
        """N:M: the greedy runs on until every group has its n removed."""
        layout = self.step_layout
        return part_updates(
            self, layout, estimate, unscored(self, layout), self.masks, self._nm_greedy, 1.0
        )

    def _prefix(self, part: BlockPart, w: Tensor, est: dict, kept: Tensor, new: Tensor):
        W, H, valid = est["W"], est["H"], est["valid"]
        prune = to_blocks((~kept | new).to(H.device, torch.float32), W.shape[1]) > 0
        # Counts per block keep the selection's totals; ties resolve along the order.
        counts = prefix_counts(est["order"], prune, valid)
        W_new = cap_prefix_weights(
            W,
            H,
            est["order"],
            counts,
            est["replay"],
            est["pre"],
            blocks_per_batch=self._per_batch(),
        )
        keep = prefix_mask(est["order"], counts, valid)
        return from_blocks(W_new, w.numel()), from_blocks(keep, w.numel()) > 0

    def _nm_greedy(self, part: BlockPart, w: Tensor, est: dict, kept: Tensor, new: Tensor):
        W, H, valid, spec = est["W"], est["H"], est["valid"], self.mask_spec
        pruned = to_blocks((~kept).to(H.device, torch.float32), W.shape[1]) > 0
        W_new, keep = cap_nm_prune(
            W, H, pruned, spec.n, spec.group, valid=valid, blocks_per_batch=self._per_batch()
        )
        return from_blocks(W_new, w.numel()), from_blocks(keep, w.numel()) > 0

    def _per_batch(self) -> int | None:
        return None if self.blocks_in_parallel < 0 else self.blocks_in_parallel
