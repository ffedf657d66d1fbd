"""OBS pruning (the oBERT / WoodFisher "WF" baseline) with a block-diagonal empirical Fisher.

Papers:
- "WoodFisher: Efficient Second-Order Approximation for Neural Network Compression",
  Singh & Alistarh, NeurIPS 2020, https://arxiv.org/abs/2004.14340
- "The Optimal BERT Surgeon: Scalable and Accurate Second-Order Pruning for Large Language
  Models" (oBERT), Kurtic et al., EMNLP 2022, https://arxiv.org/abs/2203.07259
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.errors import NumericalError
from sparseml.fields import Field, as_str, one_of, optional
from sparseml.kernels.fisher import (
    accumulate_block_gram,
    invert_block_fisher,
    mspace_block_inverse,
    num_blocks,
)
from sparseml.kernels.obs import (
    obs_group_scores,
    obs_independent_update,
    obs_prune_update,
    obs_scores,
)
from sparseml.masks import create_masks
from sparseml.modifiers.second_order import SecondOrderPruningModifier
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)
EPS32 = torch.finfo(torch.float32).eps
T = TypeVar("T")


def _on_all_ranks(fn: Callable[[], T]) -> T:
    """``fn()``, failing on every rank if it fails on one (not a hang at the next collective)."""
    error = None
    try:
        result = fn()
    except Exception as err:  # re-raised below, after the other ranks learnt about it
        error = err
    failed = dist.all_reduce_sum_(torch.tensor([float(error is not None)]))
    if error is not None:
        raise error
    if failed.item() > 0:
        raise NumericalError("OBSPruningModifier failed on another rank; nothing was written")
    return result


class _Part:
    """This rank's share of one parameter: blocks [b0, b1) = flat coordinates [c0, c1)."""

    def __init__(self, index: int, b0: int, b1: int, c0: int, c1: int) -> None:
        self.index, self.b0, self.b1, self.c0, self.c1 = index, b0, b1, c0, c1


@register_modifier
class OBSPruningModifier(SecondOrderPruningModifier):
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

    Blocks never cross parameters; the last block of a parameter is zero-padded (exact).
    With m < B the inverse is built in the m-dimensional sample space (exact for any damp);
    otherwise from a float32 Gram, which needs damp above ~1e-7 * ||G^T G / m||. Blocks live
    on ``fisher_inv_device`` (else on their parameter's device). Under torch.distributed the
    blocks of all parameters are split over the ranks; scores and new weights are gathered,
    so every rank ends with the same masks and weights. ``traces_backup_dir`` (found in WF
    recipes) is accepted and unused: OBS keeps no traces.
    """

    FIELDS = {
        "obs_update": Field("joint", one_of("joint", "independent"), "joint or reference update"),
        "traces_backup_dir": Field(None, optional(as_str), "accepted for WF recipes; unused"),
    }

    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        super().on_initialize(module, **kwargs)
        if self.traces_backup_dir is not None:
            LOG.warning("OBSPruningModifier keeps no traces: traces_backup_dir is not used")

    # ----- layout -----------------------------------------------------------------------------
    def _parts(self) -> tuple[list[_Part], int]:
        """This rank's contiguous share of the blocks of all parameters, and the block count."""
        bsz = self.fisher_block_size
        sizes = [r.param.numel() for r in self.refs]
        counts = [num_blocks(n, bsz) for n in sizes]
        total = sum(counts)
        lo, hi = dist.shard_bounds(total)
        parts, offset = [], 0
        for i, (n, count) in enumerate(zip(sizes, counts)):
            b0, b1 = max(lo - offset, 0), min(hi - offset, count)
            if b0 < b1:
                parts.append(_Part(i, b0, b1, b0 * bsz, min(b1 * bsz, n)))
            offset += count
        return parts, total

    def _gather(self, local: list[Tensor], parts: list[_Part], total: int) -> list[Tensor]:
        """Per-parameter full (numel,) vectors from each rank's (c1 - c0,) pieces."""
        bsz = self.fisher_block_size
        device = self.refs[0].param.device
        rows = torch.zeros(sum(p.b1 - p.b0 for p in parts), bsz, device=device)
        start = 0
        for p, x in zip(parts, local):
            count = p.b1 - p.b0
            rows[start : start + count].view(-1)[: p.c1 - p.c0] = x.to(device, torch.float32)
            start += count
        full = dist.all_gather_shards(rows, total).reshape(-1)
        out, offset = [], 0
        for r in self.refs:
            n = r.param.numel()
            out.append(full[offset : offset + n])
            offset += num_blocks(n, bsz) * bsz
        return out

    # ----- Fisher -----------------------------------------------------------------------------
    def _build_fisher(self, module: nn.Module) -> list[Tensor]:
        """H (b1 - b0, B, B) for each of this rank's parts (gradient sampling needs autograd)."""
        parts, _ = self._parts()
        bsz, m = self.fisher_block_size, self.num_grads
        mspace = m < bsz  # the B x B Gram would be rank-deficient: use the sample space
        store = []
        for p in parts:
            device = self.fisher_device(self.refs[p.index].param)
            if mspace:
                store.append(torch.empty(m, p.c1 - p.c0, device=device))
            else:
                store.append(torch.zeros(p.b1 - p.b0, bsz, bsz, device=device))
        row = 0
        for chunk in self.gradient_chunks(module):
            count = chunk[0].shape[0]
            for p, buf in zip(parts, store):
                grads = chunk[p.index][:, p.c0 : p.c1]
                if mspace:
                    buf[row : row + count] = grads.to(buf.device)
                else:
                    accumulate_block_gram(grads, bsz, out=buf)
            row += count
        if mspace:
            return _on_all_ranks(lambda: [mspace_block_inverse(g, bsz, self.damp) for g in store])
        return _on_all_ranks(lambda: [invert_block_fisher(g, m, self.damp) for g in store])

    # ----- pruning step -----------------------------------------------------------------------
    def prune_step(self, module: nn.Module, targets: list[float]) -> None:
        if not self.refs:
            return
        parts, total = self._parts()
        inverses = self.cached("fisher", lambda: self._build_fisher(module))
        with torch.no_grad():
            self._obs_step(parts, total, inverses, targets)

    def _obs_step(
        self, parts: list[_Part], total: int, inverses: list[Tensor], targets: list[float]
    ) -> None:
        spec = self.mask_spec
        weights = self.flat_weights()
        kept = [m.reshape(-1) for m in self.masks]
        independent = self.obs_update == "independent"

        def local_scores() -> list[Tensor]:
            out = []
            for p, H in zip(parts, inverses):
                w, pruned = weights[p.index][p.c0 : p.c1], ~kept[p.index][p.c0 : p.c1]
                if spec.kind == "block":
                    out.append(obs_group_scores(w, H, pruned, spec.group))
                else:
                    out.append(obs_scores(w, H, pruned, eps=EPS32 * independent))
            return out

        gathered = self._gather(_on_all_ranks(local_scores), parts, total)
        scores = [s.view_as(r.param) for s, r in zip(gathered, self.refs)]
        masks = create_masks(self.masked_scores(scores), targets, spec, self.global_sparsity)

        def local_weights() -> list[Tensor]:
            out = []
            for p, H in zip(parts, inverses):
                w = weights[p.index][p.c0 : p.c1]
                new = kept[p.index][p.c0 : p.c1] & ~masks[p.index].reshape(-1)[p.c0 : p.c1]
                if not independent:
                    out.append(obs_prune_update(w, H, new))
                elif spec.kind == "block":
                    out.append(obs_independent_update(w, H, new, group=spec.group))
                else:
                    out.append(obs_independent_update(w, H, new, eps=EPS32))
            return out

        for i, flat in enumerate(self._gather(_on_all_ranks(local_weights), parts, total)):
            self.write_weights(i, flat)
        self.set_masks(masks)
