"""K-FAC pruning: OBS scores and updates from a Kronecker-factored Fisher per layer.

Papers:
- "Optimizing Neural Networks with Kronecker-factored Approximate Curvature", Martens &
  Grosse, ICML 2015, https://arxiv.org/abs/1503.05671
- "WoodFisher: Efficient Second-Order Approximation for Neural Network Compression", Singh &
  Alistarh, NeurIPS 2020, https://arxiv.org/abs/2004.14340 (the K-FAC pruning baseline)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparseml.curvature import kfac_inverse_diag, kfac_matvec
from sparseml.curvature.kfac import KFACFactors
from sparseml.fields import Field, as_float
from sparseml.layouts import BlockPart
from sparseml.pruning.estimators import KFAC
from sparseml.pruning.fields import SAMPLING, SAMPLING_CHECKS, as_damp
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.updates import Scored, part_scores, part_updates
from sparseml.registry import register_modifier


def kfac_layer_problem(module: nn.Module) -> str | None:
    """Why K-FAC cannot model ``module``'s weight (None when it can)."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"belongs to a {type(module).__name__}; K-FAC needs Linear or Conv2d weights"
    if type(module).forward is not nn.Conv2d.forward:
        return f"belongs to {type(module).__name__}, whose forward is not nn.Conv2d's"
    if module.groups != 1:
        return f"belongs to a grouped Conv2d (groups={module.groups})"
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return "belongs to a Conv2d with string padding or a non-zero padding_mode"
    return None


@register_modifier
class KFACPruningModifier(PruningModifier):
    """One-shot or gradual OBS pruning with a K-FAC Fisher per Linear / Conv2d weight.

    Per pruning step (and recomputation): ``num_grads`` batches of the grad sampler give per
    layer the Kronecker factors A (inputs; Conv2d: unfolded patches) and G (output gradients),
    pi-damped with ``damp``, so that F^-1 = G^-1 (x) A^-1 (`sparseml.curvature.kfac`; the
    factors are kept, never the (out*in)^2 matrix). Scores are rho_q = w_q^2 / (2 [F^-1]_qq),
    [F^-1]_qq = [G^-1]_oo [A^-1]_ii for q = (o, i) of the row-major (out, in) weight; one
    threshold (global by default) picks the weights to remove, and the kept ones move by the
    sum of the single-weight OBS corrections, -F^-1 (w * 1[new] / diag(F^-1)), computed as
    -vec(G^-1 V A^-1). ``scale_prune_update`` scales that move (0: scores only).

    Sample recipe::

        !KFACPruningModifier
          params: ["re:.*(qkv|proj|fc1|fc2).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.5
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 64
          damp: 1.0e-5

    | field | paper | meaning |
    |---|---|---|
    | num_grads | - | batches of layer inputs and output gradients in A and G |
    | damp | lambda | pi-damping: A + sqrt(lambda pi) I, G + sqrt(lambda / pi) I |
    | scale_prune_update | - | fraction of the OBS update applied (0 = score only) |
    | mask_type | - | unstructured, block4 (summed single-weight scores) or "N:M" |

    A has no bias column (biases are neither pruned nor updated). A Linear input of shape
    (b, ..., in) counts its tokens as positions, like a Conv2d's output pixels. Only the
    weights of Linear and Conv2d (groups 1, zero padding, nn.Conv2d's own forward) can be
    selected; every selected layer must run once per forward. Layers are dealt to the ranks;
    each rank's factors come from its own batches and are averaged.
    """

    FIELDS = {
        **SAMPLING,
        "damp": Field(1e-5, as_damp, "lambda: pi-damping strength (> 0)"),
        "scale_prune_update": Field(1.0, as_float(0.0, 1.0), "fraction of the OBS update"),
    }
    CHECKS = SAMPLING_CHECKS

    def setup(self, module: nn.Module) -> None:
        for ref in self.refs:
            problem = "is not a weight" if ref.attr != "weight" else kfac_layer_problem(ref.module)
            if problem:
                raise self.field_error("params", f"selects {ref.name}, which {problem}")

    def estimator(self) -> KFAC:
        return KFAC(self.damp)

    def score(self, estimate: list[KFACFactors]) -> Scored:
        return part_scores(self, self.step_layout, estimate, self._part_scores)

    def update_weights(self, estimate, scored: Scored, masks: list[Tensor]):
        layout, scale = self.step_layout, self.scale_prune_update
        return part_updates(self, layout, estimate, scored, masks, self._part_update, scale)

    def _part_scores(self, part: BlockPart, w: Tensor, est: KFACFactors, pruned: Tensor):
        diag = kfac_inverse_diag(est).to(w.device)
        return (w.to(torch.float64).square() / (2 * diag)).to(w.dtype)

    def _part_update(self, part: BlockPart, w: Tensor, est: KFACFactors, kept, new: Tensor):
        w64 = w.to(torch.float64)
        diag = kfac_inverse_diag(est).to(w.device)
        v = torch.where(new, w64 / diag, 0.0)
        return (w64 - kfac_matvec(est, v).to(w.device)).to(w.dtype)
