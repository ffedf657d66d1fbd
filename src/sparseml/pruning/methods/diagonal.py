"""Diagonal second-order saliency (OBD) baselines: the diagonal empirical Fisher and the
diagonal of the loss Hessian. Score only; the kept weights are not updated.

Papers:
- "Optimal Brain Damage", LeCun, Denker & Solla, NeurIPS 1989,
  https://papers.nips.cc/paper/1989/hash/6c9882bbac1c7093bd25041881277658-Abstract.html
- "Faster gaze prediction with dense networks and Fisher pruning", Theis, Korshunova, Tejani &
  Huszar, 2018, https://arxiv.org/abs/1801.05787 (the diagonal-Fisher saliency)
- The WoodFisher paper's baselines (Singh & Alistarh, NeurIPS 2020,
  https://arxiv.org/abs/2004.14340): ``FisherPruner`` and ``NaiveHessianPruner``
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseml.fields import Field, one_of
from sparseml.pruning.estimators import DiagonalFisher, HessianDiagonal
from sparseml.pruning.fields import SAMPLING, SAMPLING_CHECKS
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.updates import Scored, part_scores
from sparseml.registry import register_modifier


def obd_scores(w: Tensor, curvature: Tensor, damp: float) -> Tensor:
    """1/2 (max(c, 0) + damp) w^2 in float64, returned in ``w``'s dtype (higher = keep)."""
    c = curvature.to(w.device, torch.float64).clamp_min(0.0) + damp
    return (0.5 * c * w.to(torch.float64).square()).to(w.dtype)


def obd_scored(pruner, estimate: list[Tensor]) -> Scored:
    """Scores 1/2 (max(c, 0) + damp) w^2 from a per-layer curvature estimate c."""
    score = lambda part, w, c, pruned: obd_scores(w, c, pruner.damp)  # noqa: E731
    return part_scores(pruner, pruner.step_layout, estimate, score)


@register_modifier
class DiagFisherPruningModifier(PruningModifier):
    """One-shot or gradual pruning by the diagonal empirical Fisher (OBD with F for H).

    Per pruning step (and recomputation), m masked gradient samples g (mini-batch-mean
    gradients, as for OBS) give F_qq = (1/m) sum_i g_q^(i)^2 and the score
    rho_q = 1/2 (F_qq + damp) w_q^2, which is exactly the OBS score w_q^2 / (2 [F^-1]_qq) of the
    damped *diagonal* Fisher damp*I + diag(F); damp > 0 also orders weights with F_qq = 0 by
    magnitude. The reference adds the constant 1e-4 instead, i.e. a damp of 2e-4 / w_q^2.
    No weight is updated. block4 ranks groups of 4 by their summed score, "N:M" picks the
    lowest n scores per group of m.

    Sample recipe::

        !DiagFisherPruningModifier
          params: ["re:.*(qkv|proj|fc1|fc2).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.5
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 1024
          damp: 1.0e-7

    | field | paper | meaning |
    |---|---|---|
    | num_grads | N | gradient samples in the diagonal Fisher |
    | damp | lambda | added to F_qq (score 1/2 (F_qq + lambda) w^2) |
    | num_recomputations | - | rescorings between the current and the target sparsity |
    | global_sparsity | - | one threshold over all params (default) or one per param |
    | mask_type | - | unstructured, block4 or "N:M" |

    Estimator: `DiagonalFisher` (2 d float64 plus one chunk of gradients); each rank scores
    its whole parameters; every rank ends with the same masks.
    """

    FIELDS = SAMPLING
    CHECKS = SAMPLING_CHECKS

    def estimator(self) -> DiagonalFisher:
        return DiagonalFisher()

    def score(self, estimate: list[Tensor]) -> Scored:
        return obd_scored(self, estimate)


@register_modifier
class HessianDiagPruningModifier(PruningModifier):
    """One-shot or gradual pruning by the diagonal of the loss Hessian (OBD).

    Per pruning step: H_qq, the diagonal of the Hessian of the grad sampler's mini-batch loss
    averaged over ``num_grads`` batches, by double backprop (`sparseml.curvature.hessian`):
    ``hessian_method: hutchinson`` (default) uses one Rademacher probe z per batch and
    averages z * (H z) (unbiased), ``exact`` computes every H e_q (one double-backward pass per
    selected weight and batch: tiny models only, as the reference's ``NaiveHessianPruner``).
    The score is rho_q = 1/2 (max(H_qq, 0) + damp) w_q^2: negative curvature (a saddle
    direction, or Hutchinson noise) is clamped to 0, where the quadratic model promises no
    loss increase. No weight is updated.

    Sample recipe::

        !HessianDiagPruningModifier
          params: ["re:.*(qkv|proj|fc1|fc2).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.5
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 256
          hessian_method: hutchinson
          damp: 1.0e-7

    | field | paper | meaning |
    |---|---|---|
    | num_grads | m | batches (Hutchinson: one probe each) |
    | hessian_method | - | hutchinson (z * Hz, Rademacher z) or exact (every H e_q) |
    | damp | lambda | added to the clamped H_qq |
    | mask_type | - | unstructured, block4 or "N:M" |

    Estimator: `HessianDiagonal`; all ranks use the same probes, seeded by the sample stream's
    position (a resumed run draws the same ones), and average their estimates.
    """

    FIELDS = {
        **SAMPLING,
        "hessian_method": Field(
            "hutchinson", one_of("hutchinson", "exact"), "Hessian diagonal estimator"
        ),
    }
    CHECKS = SAMPLING_CHECKS

    def estimator(self) -> HessianDiagonal:
        return HessianDiagonal(self.hessian_method)

    def score(self, estimate: list[Tensor]) -> Scored:
        return obd_scored(self, estimate)
