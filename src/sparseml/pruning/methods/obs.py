"""OBS pruning (the oBERT / WoodFisher "WF" baseline) with a block-diagonal empirical Fisher.

Papers:
- "WoodFisher: Efficient Second-Order Approximation for Neural Network Compression",
  Singh & Alistarh, NeurIPS 2020, https://arxiv.org/abs/2004.14340
- "The Optimal BERT Surgeon: Scalable and Accurate Second-Order Pruning for Large Language
  Models" (oBERT), Kurtic et al., EMNLP 2022, https://arxiv.org/abs/2203.07259
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from sparseml.fields import Check, Field, as_bool, as_float, as_str, one_of, optional
from sparseml.kernels.obs import (
    obs_group_scores,
    obs_independent_update,
    obs_prune_update,
    obs_scores,
)
from sparseml.layouts import BlockPart
from sparseml.pruning.estimators import BlockFisher
from sparseml.pruning.fields import BLOCKS, SAMPLING, SAMPLING_CHECKS, mask_spec_of
from sparseml.pruning.flops_plan import FLOPS, FLOPS_CHECKS
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.updates import Scored, part_scores, part_updates
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)
EPS32 = torch.finfo(torch.float32).eps

# Fields of the OBS family (OBS, WoodFisher, WoodTaylor, K-FAC): the share of the update.
OBS_UPDATE = {
    "scale_prune_update": Field(1.0, as_float(0.0, 1.0), "share of the OBS update (0: OBD)"),
}
DYNAMIC_BLOCKS = {
    "dynamic_blocks": Field(False, as_bool, "Fisher blocks over unpruned weights only"),
}
DYNAMIC_CHECKS = (
    Check(
        "dynamic_blocks",
        lambda m: m._values["dynamic_blocks"] and m._values.get("fisher_block_size", 0) is None,
        "needs a fisher_block_size (blockwise)",
    ),
    Check(
        "dynamic_blocks",
        lambda m: (
            m._values["dynamic_blocks"]
            and getattr(mask_spec_of(m._values), "kind", "") != "unstructured"
        ),
        "needs mask_type: unstructured",
    ),
)
TRACES = {"traces_backup_dir": Field(None, optional(as_str), "accepted for WF recipes; unused")}


def warn_traces(pruner: Any) -> None:
    if pruner.traces_backup_dir is not None:
        LOG.warning("%s keeps no traces: traces_backup_dir is not used", type(pruner).__name__)


@register_modifier
class OBSPruningModifier(PruningModifier):
    """Gradual or one-shot OBS pruning with a block-diagonal inverse empirical Fisher.

    Per pruning step (and per recomputation): m masked gradient samples give, per parameter
    and per block of B consecutive flattened weights, F_b = damp*I + (1/m) sum g_b g_b^T and
    H_b = F_b^{-1}. Scores are rho_q = w_q^2 / (2 [H]_qq) (block4: 1/2 w_Q^T [H]_QQ^{-1} w_Q
    per group of 4 consecutive weights); one threshold (global by default) picks the weights
    to remove; then every block is corrected by the *joint* OBS update for the set Q_b it
    loses, w <- w - H[:, Q_b] [H]_{Q_b Q_b}^{-1} w_{Q_b}, the best weights with w_{Q_b} = 0
    under the local quadratic model. ``obs_update: independent`` instead adds the
    single-weight (or single-group) corrections as the reference does, including its
    float32-eps terms.

    Sample recipe::

        !OBSPruningModifier
          params: ["re:.*(qkv|proj|fc1|fc2).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.5
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 4096
          fisher_block_size: 192
          damp: 1.0e-6
          num_recomputations: 1

    | field | paper | meaning |
    |---|---|---|
    | num_grads | m | gradient samples per Fisher estimate |
    | damp | lambda | absolute dampening: F = lambda*I + (1/m) G^T G |
    | fisher_block_size | B | consecutive flattened weights per Fisher block |
    | num_recomputations | - | Fisher rebuilds between the current and the target sparsity |
    | obs_update | - | joint (exact per block) or independent (oBERT/WF reference) |
    | mask_type | - | unstructured, block4 (groups of 4, B % 4 == 0) or "N:M" |
    | scale_prune_update | - | share of the update applied (0: OBD, scores only) |
    | flops_power, flops_target | - | FLOPs-aware scores / MACs target (`flops_plan`) |
    | dynamic_blocks | - | blocks of B consecutive *unpruned* weights |

    Blocks never cross parameters; the last block of a parameter is zero-padded (exact).
    With m < B the inverse is built in the m-dimensional sample space (exact for any damp);
    otherwise from a float64 Gram. Under torch.distributed the blocks of all parameters are
    split over the ranks; scores and new weights are gathered, so every rank ends with the
    same masks and weights. ``traces_backup_dir`` (found in WF recipes) is accepted and unused.
    The WoodFisher repository's blockwise pruners are this class: ``woodfisherblock`` with
    ``--fittable-params P`` is ``fisher_block_size: P`` (and ``obs_update: independent`` for
    its update) and ``woodfisherblockdynamic`` is ``dynamic_blocks: true`` (docs/pruners.md).
    """

    FIELDS = {
        **SAMPLING,
        **BLOCKS,
        **FLOPS,
        **OBS_UPDATE,
        **DYNAMIC_BLOCKS,
        "obs_update": Field("joint", one_of("joint", "independent"), "joint or reference update"),
        **TRACES,
    }
    CHECKS = (*SAMPLING_CHECKS, *FLOPS_CHECKS, *DYNAMIC_CHECKS)

    def setup(self, module: nn.Module) -> None:
        warn_traces(self)

    def estimator(self) -> BlockFisher:
        return BlockFisher(self.fisher_block_size, self.damp, self.dynamic_blocks)

    def score(self, estimate: list[Tensor]) -> Scored:
        return part_scores(self, self.step_layout, estimate, self.part_scores)

    def update_weights(self, estimate: list[Tensor], scored: Scored, masks: list[Tensor]):
        layout, scale = self.step_layout, self.scale_prune_update
        return part_updates(self, layout, estimate, scored, masks, self.part_update, scale)

    def part_scores(self, part: BlockPart, w: Tensor, H: Tensor, pruned: Tensor) -> Tensor:
        spec = self.mask_spec
        if spec.kind == "block":
            return obs_group_scores(w, H, pruned, spec.group)
        return obs_scores(w, H, pruned, eps=EPS32 * (self.obs_update == "independent"))

    def part_update(self, part: BlockPart, w: Tensor, H: Tensor, kept: Tensor, new: Tensor):
        if self.obs_update == "joint":
            return obs_prune_update(w, H, new)
        if self.mask_spec.kind == "block":
            return obs_independent_update(w, H, new, group=self.mask_spec.group)
        return obs_independent_update(w, H, new, eps=EPS32)
