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

from sparseml.fields import Field, as_str, one_of, optional
from sparseml.kernels.obs import (
    obs_group_scores,
    obs_independent_update,
    obs_prune_update,
    obs_scores,
)
from sparseml.layouts import BlockPart
from sparseml.modifiers.block_pruner import BlockPruningModifier
from sparseml.modifiers.obs_family import DYNAMIC_BLOCKS_FIELDS, OBS_FAMILY_FIELDS, OBSFamilyMixin
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)
EPS32 = torch.finfo(torch.float32).eps


@register_modifier
class OBSPruningModifier(OBSFamilyMixin, BlockPruningModifier):
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
    | flops_power, flops_target | - | FLOPs-aware scores / MACs target (`obs_family`) |
    | dynamic_blocks | - | blocks of B consecutive *unpruned* weights (spec 7.5) |

    Blocks never cross parameters; the last block of a parameter is zero-padded (exact).
    With m < B the inverse is built in the m-dimensional sample space (exact for any damp);
    otherwise from a float64 Gram (accurate for damp down to ~1e-10 ||G^T G / m||). Blocks live
    on ``fisher_inv_device`` (else on their parameter's device). Under torch.distributed the
    blocks of all parameters are split over the ranks; scores and new weights are gathered,
    so every rank ends with the same masks and weights. ``traces_backup_dir`` (found in WF
    recipes) is accepted and unused: OBS keeps no traces. The WoodFisher repository's
    blockwise pruners are this class: ``woodfisherblock`` with ``--fittable-params P`` is
    ``fisher_block_size: P`` (and ``obs_update: independent`` for its update),
    ``--flops-power``/``--flops-target`` are ``flops_power``/``flops_target`` and
    ``woodfisherblockdynamic`` is ``dynamic_blocks: true`` (see `obs_family` and
    docs/pruners.md).
    """

    FIELDS = {
        **OBS_FAMILY_FIELDS,
        **DYNAMIC_BLOCKS_FIELDS,
        "obs_update": Field("joint", one_of("joint", "independent"), "joint or reference update"),
        "traces_backup_dir": Field(None, optional(as_str), "accepted for WF recipes; unused"),
    }

    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        super().on_initialize(module, **kwargs)
        if self.traces_backup_dir is not None:
            LOG.warning("OBSPruningModifier keeps no traces: traces_backup_dir is not used")

    # ----- the method: scores and update of one part ----------------------------------------
    def part_scores(self, part: BlockPart, w: Tensor, H: Tensor, pruned: Tensor) -> Tensor:
        spec = self.mask_spec
        if spec.kind == "block":
            return obs_group_scores(w, H, pruned, spec.group)
        return obs_scores(w, H, pruned, eps=EPS32 * (self.obs_update == "independent"))

    def part_update(
        self, part: BlockPart, w: Tensor, H: Tensor, kept: Tensor, new: Tensor
    ) -> Tensor:
        if self.obs_update == "joint":
            return obs_prune_update(w, H, new)
        if self.mask_spec.kind == "block":
            return obs_independent_update(w, H, new, group=self.mask_spec.group)
        return obs_independent_update(w, H, new, eps=EPS32)
