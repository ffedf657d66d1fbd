"""WoodTaylor pruning: OBS with the first-order term of the loss (WoodFisher paper, sec. 5).

Paper: "WoodFisher: Efficient Second-Order Approximation for Neural Network Compression",
S. P. Singh & D. Alistarh, NeurIPS 2020, https://arxiv.org/abs/2004.14340
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparseml import dist
from sparseml.fields import Check, Field, as_bool, one_of
from sparseml.kernels.fisher import block_matvec
from sparseml.kernels.obs import obs_independent_update, obs_prune_update, obs_scores
from sparseml.layouts import BlockPart
from sparseml.pruning.estimators import BlockFisherAndMean, FullFisher
from sparseml.pruning.fields import (
    BLOCKS,
    SAMPLING,
    SAMPLING_CHECKS,
    as_damp,
    block_size_or_full,
)
from sparseml.pruning.flops_plan import FLOPS, FLOPS_CHECKS
from sparseml.pruning.methods.obs import DYNAMIC_BLOCKS, DYNAMIC_CHECKS, OBS_UPDATE
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.updates import (
    Scored,
    matrix_free_scores,
    matrix_free_update,
    part_scores,
    part_updates,
)
from sparseml.registry import register_modifier

TINY = torch.finfo(torch.float64).tiny


@register_modifier
class WoodTaylorPruningModifier(PruningModifier):
    """Gradual or one-shot WoodTaylor: OBS on the local model with the gradient term.

    With g_bar the mean of the m gradient samples, F = damp*I + (1/m) sum g g^T, H = F^-1 and
    h = H g_bar, the model L(w + d) ~ L(w) + g_bar^T d + 1/2 d^T F d gives, for removing q:

    - stat_q = 1/2 (w_q - h_q)^2 / H_qq - 1/2 g_bar^T H g_bar; the constant second term ranks
      nothing, so the scores are the first term;
    - update d = -h - H (1_new * (w - h) / diag(H)) (``obs_update: independent``, the
      reference's), or per Fisher block the joint d = -h - H[:, Q] [H]_QQ^-1 (w - h)_Q
      (``joint``, the exact minimiser with the new set Q removed; blockwise only).

    So WoodTaylor is OBS applied to the shifted weights u = w - h; every kept weight moves
    along -h and ``scale_prune_update`` scales the whole move. ``normalize_hgp: true`` moves
    by -h / ||h|| (norm over all selected weights, all ranks) in place of -h; the scores and
    the OBS correction keep u = w - h, as the reference's ``--normalize-hgp`` does. With G the
    m x d samples, H g_bar = G^T (damp m I + G G^T)^-1 1: for small damp the step lowers every
    sample's *linearised* loss by about 1, far outside the quadratic model on a trained network
    (one-shot 50% of a 78.3% vit_digits, damp 1e-5: top-1 23.3%, 73.6% with ``normalize_hgp``,
    full WoodFisher 78.1%); use ``normalize_hgp: true`` (the recipes do) or a small
    ``scale_prune_update``. The full form computes h = Z^T (L^-1 1) / damp in float64
    (`MFACInverse.mean_gradient_mul`): ``mul(g_bar)`` cancels two terms of size |g_bar| / damp
    and loses the small-damp digits in float32.

    ``fisher_block_size: null`` (default): one matrix-free Fisher over all unpruned weights
    (`FullFisher`, the reference's ``woodtaylor``); ``B``: blocks of B consecutive weights per
    parameter (`BlockFisherAndMean`, ``woodtaylorblock``), ``dynamic_blocks: true`` B
    consecutive unpruned weights. One pass over the samples gives both H and g_bar.

    Sample recipe::

        !WoodTaylorPruningModifier
          params: __ALL_PRUNABLE__
          init_sparsity: 0.0
          final_sparsity: 0.6
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 1024
          damp: 1.0e-5
          fisher_block_size: 128

    | field | paper / WF option | meaning |
    |---|---|---|
    | num_grads | N | samples for both F and g_bar |
    | damp | lambda, --fisher-damp | absolute dampening of F |
    | fisher_block_size | --fittable-params | B; null (or -1): one full Fisher |
    | normalize_hgp | --normalize-hgp | h / \\|h\\| in place of h |
    | obs_update | - | independent (reference) or joint (blockwise) |
    """

    FIELDS = {
        **SAMPLING,
        **BLOCKS,
        **FLOPS,
        **OBS_UPDATE,
        **DYNAMIC_BLOCKS,
        "fisher_block_size": Field(None, block_size_or_full, "B; null or -1: one full Fisher"),
        "damp": Field(1e-5, as_damp, "lambda: Fisher dampening (> 0)"),
        "normalize_hgp": Field(False, as_bool, "use H g_bar / ||H g_bar||"),
        "obs_update": Field(
            "independent", one_of("independent", "joint"), "reference or joint block update"
        ),
    }
    CHECKS = (
        *SAMPLING_CHECKS,
        *FLOPS_CHECKS,
        *DYNAMIC_CHECKS,
        Check(
            "obs_update",
            lambda m: m._values["obs_update"] == "joint" and m._values["fisher_block_size"] is None,
            "joint needs a fisher_block_size (blockwise)",
        ),
    )

    def estimator(self) -> FullFisher | BlockFisherAndMean:
        if self.fisher_block_size is None:
            return FullFisher(self.damp, with_mean=True)
        return BlockFisherAndMean(self.fisher_block_size, self.damp, self.dynamic_blocks)

    def score(self, estimate) -> Scored:
        if self.fisher_block_size is None:
            h = estimate.inverse.mean_gradient_mul()
            scored = matrix_free_scores(self, estimate, shift=h)
            scored.estimate = (
                h / h.double().norm().clamp_min(TINY).to(h.dtype) if (self.normalize_hgp) else None
            )  # the move, when it is not h
            return scored
        shifted = self._with_shift(estimate)
        scored = part_scores(self, self.step_layout, shifted, self._part_scores)
        scored.estimate = shifted
        return scored

    def update_weights(self, estimate, scored: Scored, masks: list[Tensor]):
        scale = self.scale_prune_update
        if self.fisher_block_size is None:
            return matrix_free_update(self, estimate, scored, masks, scale, move=scored.estimate)
        layout, update = self.step_layout, self._part_update
        return part_updates(self, layout, scored.estimate, scored, masks, update, scale)

    def _with_shift(self, estimates: list[tuple[Tensor, Tensor]]) -> list[tuple]:
        """(H, h = H g_bar, move) per part: the move is h, with ``normalize_hgp`` h over its
        global norm (only the move is normalised, as in the reference)."""
        shifts = raw = [block_matvec(H, g) for H, g in estimates]
        if self.normalize_hgp:
            device = shifts[0].device if shifts else self.refs[0].param.device
            total = sum(
                (s.double().square().sum().to(device) for s in shifts),
                torch.zeros((), dtype=torch.float64, device=device),
            )
            norm = math.sqrt(float(dist.all_reduce_sum_(total.reshape(1))[0]))
            shifts = [s / max(norm, TINY) for s in shifts]
        return [(H, h, s) for (H, _), h, s in zip(estimates, raw, shifts)]

    def _part_scores(self, part: BlockPart, w: Tensor, est: tuple, pruned: Tensor) -> Tensor:
        H, h, _ = est
        return obs_scores(w - h.to(w.device, w.dtype), H, pruned)

    def _part_update(self, part: BlockPart, w: Tensor, est: tuple, kept: Tensor, new: Tensor):
        H, h, move = est
        h = h.to(w.device, w.dtype)
        update = obs_prune_update if self.obs_update == "joint" else obs_independent_update
        return update(w - h, H, new) + (h - move.to(w.device, w.dtype))  # -move in place of -h
