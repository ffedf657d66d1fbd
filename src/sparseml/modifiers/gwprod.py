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
from torch import Tensor, nn

from sparseml.curvature import gradient_sums
from sparseml.fields import Field, one_of
from sparseml.layouts import BlockPart, LayerLayout
from sparseml.memory import MemoryItem
from sparseml.modifiers.block_pruner import BlockPruningModifier
from sparseml.registry import register_modifier


@register_modifier
class GWProdPruningModifier(BlockPruningModifier):
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

    Unlike the reference, the scores are rebuilt from fresh samples at every pruning step
    (its accumulator is never reset, so gradual steps mix all earlier samples), and NaN
    gradients stop the step with an error instead of being skipped.
    """

    WITHOUT_FIELDS = ("fisher_block_size", "fisher_inv_device", "damp")
    FIELDS = {
        "score": Field("abs", one_of("abs", "movement"), "sum of abs(w*g), or of -w*g"),
    }

    def block_layout(self) -> LayerLayout:
        return LayerLayout([r.param.numel() for r in self.refs])

    def estimate(self, module: nn.Module, layout) -> list[Tensor]:
        sizes = [r.param.numel() for r in self.refs]
        sums = gradient_sums(
            self.gradient_chunks(module),
            sizes,
            self.refs[0].param.device,
            absolute=self.score == "abs",
        )
        return layout.take(sums)

    def part_scores(self, part: BlockPart, w: Tensor, est: Tensor, pruned: Tensor) -> Tensor:
        w64 = w.to(torch.float64)
        est = est.to(w.device)
        scores = w64.abs() * est if self.score == "abs" else -w64 * est
        return scores.to(w.dtype)

    def memory_plan(self, block: int | None, m: int) -> tuple[list[MemoryItem], str]:
        d = sum(r.param.numel() for r in self.refs)
        width = torch.finfo(self.work_dtype).bits // 8
        device = self.refs[0].param.device if self.refs else torch.device("cpu")
        items = [
            MemoryItem("gradient sums (float64)", d * 8, device),
            MemoryItem("gradient chunk", min(self.GRAD_CHUNK, m) * d * width, device),
        ]
        return items, f"num_grads={m} and {d} weights"
