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

import logging

import torch
from torch import Tensor, nn

from sparseml.curvature import (
    GradientMoments,
    hessian_diagonal,
    probe_seed,
    rademacher_probes,
    unit_vectors,
)
from sparseml.fields import Field, one_of
from sparseml.layouts import BlockPart, LayerLayout
from sparseml.memory import MemoryItem
from sparseml.modifiers.block_pruner import BlockPruningModifier
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)
EXACT_WARN_WEIGHTS = 20_000  # exact mode: one double-backward pass per weight and batch
# Fields of the block pruners that mean nothing without Fisher blocks.
NO_BLOCKS = ("fisher_block_size", "fisher_inv_device")


def obd_scores(w: Tensor, curvature: Tensor, damp: float) -> Tensor:
    """1/2 (max(c, 0) + damp) w^2 in float64, returned in ``w``'s dtype (higher = keep)."""
    c = curvature.to(w.device, torch.float64).clamp_min(0.0) + damp
    return (0.5 * c * w.to(torch.float64).square()).to(w.dtype)


def _plan(refs: list, per_weight: list[tuple[str, int]], drivers: str):
    """Memory items of per-weight vectors: (label, bytes per weight) each, on the params'."""
    d = sum(r.param.numel() for r in refs)
    device = refs[0].param.device if refs else torch.device("cpu")
    return [MemoryItem(label, d * nbytes, device) for label, nbytes in per_weight], drivers


@register_modifier
class DiagFisherPruningModifier(BlockPruningModifier):
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

    Memory: 2 d float64 plus one chunk of gradients. Each rank scores its whole parameters
    (`LayerLayout`); every rank ends with the same masks.
    """

    WITHOUT_FIELDS = NO_BLOCKS

    def block_layout(self) -> LayerLayout:
        return LayerLayout([r.param.numel() for r in self.refs])

    def part_scores(self, part: BlockPart, w: Tensor, est: Tensor, pruned: Tensor) -> Tensor:
        return obd_scores(w, est, self.damp)

    def memory_plan(self, block: int | None, m: int) -> tuple[list[MemoryItem], str]:
        width = torch.finfo(self.work_dtype).bits // 8
        chunk = min(self.GRAD_CHUNK, m) * width
        items = [("diagonal Fisher sums (float64)", 16), ("gradient chunk", chunk)]
        return _plan(self.refs, items, f"num_grads={m}")

    def estimate(self, module: nn.Module, layout) -> list[Tensor]:
        device = self.refs[0].param.device
        moments = GradientMoments([r.param.numel() for r in self.refs], device)
        for chunk in self.gradient_chunks(module):
            moments.add(chunk)
            del chunk  # not alive while the next chunk is drawn
        return layout.take(moments.diagonal_fisher())


@register_modifier
class HessianDiagPruningModifier(BlockPruningModifier):
    """One-shot or gradual pruning by the diagonal of the loss Hessian (OBD).

    Per pruning step: H_qq, the diagonal of the Hessian of the grad sampler's mini-batch loss
    averaged over ``num_grads`` batches, by double backprop (`sparseml.curvature.hessian`):
    ``hessian_method: hutchinson`` (default) uses one Rademacher probe z per batch and
    averages z * (H z) (unbiased; standard error of H_qq about sqrt(sum_{j != q} H_qj^2 / m)
    plus the batch noise), ``exact`` computes every H e_q (one double-backward pass per
    selected weight and batch: tiny models only, as the reference's ``NaiveHessianPruner``).
    The score is rho_q = 1/2 (max(H_qq, 0) + damp) w_q^2: negative curvature (a saddle
    direction, or Hutchinson noise) is clamped to 0, where the quadratic model promises no
    loss increase. The reference uses w^2 H_qq without the 1/2 (same order) and no clamp.
    No weight is updated.

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

    Batches come from the grad sampler; the double backward runs on the unwrapped model (DDP
    is not involved) and each rank's estimate is averaged over the ranks; all ranks use the same
    probes, seeded by the sample stream's position (a resumed run draws the same ones).
    """

    WITHOUT_FIELDS = NO_BLOCKS

    def block_layout(self) -> LayerLayout:
        return LayerLayout([r.param.numel() for r in self.refs])

    def part_scores(self, part: BlockPart, w: Tensor, est: Tensor, pruned: Tensor) -> Tensor:
        return obd_scores(w, est, self.damp)

    FIELDS = {
        "hessian_method": Field(
            "hutchinson", one_of("hutchinson", "exact"), "Hessian diagonal estimator"
        ),
    }

    def estimate(self, module: nn.Module, layout) -> list[Tensor]:
        assert self.grad_sampler is not None
        params = [r.param for r in self.refs]
        sizes = [p.numel() for p in params]
        devices = [p.device for p in params]
        dtype = self.work_dtype
        if self.hessian_method == "exact":
            if sum(sizes) > EXACT_WARN_WEIGHTS:
                LOG.warning(
                    "HessianDiagPruningModifier: hessian_method exact runs %d double-backward "
                    "passes per batch (one per selected weight); hutchinson runs one",
                    sum(sizes),
                )
            vectors = unit_vectors(sizes, devices, dtype)
        else:
            seed = probe_seed(self.grad_sampler.state_dict())
            vectors = rademacher_probes(sizes, devices, dtype, seed)
        pairs = self.grad_sampler.iter_hessian_products(
            module,
            params,
            self.num_grads,
            vectors,
            desc=f"{type(self).__name__} Hessian-vector products",
            dtype=dtype,
        )
        return layout.take(hessian_diagonal(pairs, sizes, self.num_grads))

    def memory_plan(self, block: int | None, m: int) -> tuple[list[MemoryItem], str]:
        width = torch.finfo(self.work_dtype).bits // 8
        items = [("Hessian diagonal sums (float64)", 8), ("probe and product", 2 * width)]
        return _plan(self.refs, items, "the selected weights")
