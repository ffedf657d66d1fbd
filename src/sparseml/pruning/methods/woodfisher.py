"""Full WoodFisher pruning: OBS with ONE inverse empirical Fisher over all selected weights.

Paper: "WoodFisher: Efficient Second-Order Approximation for Neural Network Compression",
S. P. Singh & D. Alistarh, NeurIPS 2020, https://arxiv.org/abs/2004.14340
"""

from __future__ import annotations

from torch import Tensor

from sparseml.fields import Field
from sparseml.pruning.estimators import FullFisher
from sparseml.pruning.fields import DEVICE, SAMPLING, SAMPLING_CHECKS, as_damp
from sparseml.pruning.flops_plan import FLOPS, FLOPS_CHECKS
from sparseml.pruning.methods.obs import OBS_UPDATE
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.updates import Scored, matrix_free_scores, matrix_free_update
from sparseml.registry import register_modifier


@register_modifier
class WoodFisherPruningModifier(PruningModifier):
    """Gradual or one-shot full WoodFisher: OBS scores and updates from the inverse of one
    empirical Fisher over every unpruned selected weight (no blocks).

    Per pruning step (and recomputation): m masked gradient samples g_i, restricted to the
    d unpruned weights, give F = damp*I + (1/m) sum g_i g_i^T (d x d) and H = F^-1, which is
    never formed: the matrix-free M-FAC kernel (m d + 3 m^2 memory, m^2 d flops) answers
    diag(H) and H x. Scores are rho_q = w_q^2 / (2 H_qq) (the reference's statistic without
    the 1/2 ranks the same); one threshold (global by default) picks the weights to remove, Q;
    the kept weights move by ``scale_prune_update`` * H (-w * 1_Q / diag(H)), the sum of the
    single-weight OBS corrections (the reference's update). Pruned weights are outside the
    Fisher: they stay 0.

    Sample recipe::

        !WoodFisherPruningModifier
          params: ["re:.*(qkv|proj|fc1|fc2).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.6
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 1024
          damp: 1.0e-5
          num_recomputations: 4
          recomputation_inter_func: poly
          recompute_degree: 2

    | field | paper / WF option | meaning |
    |---|---|---|
    | num_grads | N, --fisher-subsample-size | gradient samples per Fisher |
    | damp | lambda, --fisher-damp | absolute dampening of F |
    | num_recomputations | --recompute-num + 1 | Fisher builds per pruning step |
    | recompute_num | --recompute-num | WF spelling: R recomputations = R + 1 builds |
    | recomputation_inter_func | --recompute-schedule | linear, cubic or poly |
    | recompute_degree | --recompute-degree | degree of the poly spacing |
    | scale_prune_update | --scale-prune-update | share of the update (0: OBD, scores only) |
    | flops_power | --flops-power | scores / (MACs per weight)^power |
    | flops_target | --flops-target | MACs fraction to keep instead of final_sparsity |
    | global_sparsity | --woodburry-joint-sparsify | one threshold over all layers |

    The WoodFisher repository's ``woodfisherblock`` is `OBSPruningModifier` with
    ``fisher_block_size: P``; ``woodtaylor`` is `WoodTaylorPruningModifier` (docs/pruners.md).
    Differences from the reference, on purpose: exactly round(s N) weights go (no extra one);
    the recomputation schedule has no float assert; the FLOPs target is met by one sorted
    selection. Under torch.distributed every rank builds the same inverse from the averaged
    samples; rank 0's scores and update are broadcast, so all ranks agree.
    """

    FIELDS = {
        **SAMPLING,
        **DEVICE,
        **FLOPS,
        **OBS_UPDATE,
        "damp": Field(1e-5, as_damp, "lambda: Fisher dampening (> 0)"),
    }
    CHECKS = (*SAMPLING_CHECKS, *FLOPS_CHECKS)

    def estimator(self) -> FullFisher:
        return FullFisher(self.damp)

    def score(self, estimate) -> Scored:
        return matrix_free_scores(self, estimate)

    def update_weights(self, estimate, scored: Scored, masks: list[Tensor]) -> None:
        matrix_free_update(self, estimate, scored, masks, self.scale_prune_update)
