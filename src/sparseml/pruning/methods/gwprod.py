"""GWProd: first-order gradient-times-weight saliency, the CAP paper's "GW" baseline.

Papers:
- "Movement Pruning: Adaptive Sparsity by Fine-Tuning", Sanh, Wolf & Rush, NeurIPS 2020,
  https://arxiv.org/abs/2005.07683 (the score -w * dL/dw)
- "CAP: Correlation-Aware Pruning for Highly-Accurate Sparse Vision Models", Kuznedelev,
  Kurtic, Frantar & Alistarh, NeurIPS 2023, https://arxiv.org/abs/2210.09223 (the baseline;
  recipe ``one_shot/gw/gw_vit_sp=0.50_Ng=4096.yaml``)
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseml.fields import Field, one_of
from sparseml.layouts import BlockPart
from sparseml.pruning.estimators import GradientSums
from sparseml.pruning.fields import SAMPLING, SAMPLING_CHECKS
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.updates import Scored, part_scores
from sparseml.registry import register_modifier


@register_modifier
class GWProdPruningModifier(PruningModifier):
    """One-shot or gradual pruning by gradient-times-weight scores summed over samples.

    Per pruning step (and recomputation), m masked gradient samples g^(i) (mini-batch-mean
    gradients from the grad sampler) give

    - ``score: abs`` (default): rho_q = sum_i |w_q g_q^(i)|, what CAP's code accumulates, so
      CAP's recipes reproduce its baseline;
    - ``score: movement``: rho_q = sum_i -w_q g_q^(i) = -m w_q g_bar_q, the first-order
      estimate of the loss *increase* when w_q is removed (the form CAP's docstring states).
      At a trained model g_bar is mostly noise, so one-shot it ranks weights almost at random
      (vit_digits at 50%: 15% top-1 against 97% dense); it suits movement-style gradual use.

    No weight is updated. block4 ranks groups of 4 by their summed score; "N:M" keeps the
    m - n highest scores per group of m; ``global_sparsity`` (default true) uses one threshold.

    Sample recipe (CAP's, which loads unchanged)::

        !GWProdPruningModifier
          params: ['re:.*(attn.(qkv|proj)|mlp.fc\\d+).weight']
          init_sparsity: 0.5
          final_sparsity: 0.5
          start_epoch: 0
          end_epoch: 1
          update_frequency: 1
          mask_type: unstructured
          global_sparsity: True
          num_grads: 4096

    | field | paper | meaning |
    |---|---|---|
    | num_grads | m | gradient samples summed into the scores |
    | grad_sampler_kwargs | - | keyword arguments of the grad sampler's data_loader_builder |
    | score | - | abs (sum of abs(w g), CAP's code) or movement (sum of -w g) |
    | num_recomputations | - | rescorings between the current and the target sparsity |
    | mask_type | - | unstructured, block4 or "N:M" |

    Estimator: `GradientSums`. Unlike the reference, the scores are rebuilt from fresh samples
    at every pruning step (its accumulator is never reset, so gradual steps mix all earlier
    samples), and NaN gradients stop the step with an error instead of being skipped.
    """

    FIELDS = {
        **SAMPLING,
        "score": Field("abs", one_of("abs", "movement"), "sum of abs(w*g), or of -w*g"),
    }
    WITHOUT_FIELDS = ("damp",)
    CHECKS = SAMPLING_CHECKS

    def estimator(self) -> GradientSums:
        return GradientSums(absolute=self._values["score"] == "abs")

    def score(self, estimate: list[Tensor]) -> Scored:
        return part_scores(self, self.step_layout, estimate, self._part_scores)

    def _part_scores(self, part: BlockPart, w: Tensor, est: Tensor, pruned: Tensor) -> Tensor:
        w64 = w.to(torch.float64)
        est = est.to(w.device)
        scores = w64.abs() * est if self._values["score"] == "abs" else -w64 * est
        return scores.to(w.dtype)
