"""FastCAP, the fast variant of CAP: Correlation-Aware Pruning for Highly-Accurate Sparse
Vision Models.

Paper: Kuznedelev, Kurtic, Frantar, Alistarh, https://arxiv.org/abs/2210.09223
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sparseml.curvature import shared_block_fishers
from sparseml.fields import Field, as_bool, as_int, optional
from sparseml.kernels.fast_cap import fast_cap_prune
from sparseml.kernels.fisher import from_blocks, to_blocks
from sparseml.memory import MemoryItem
from sparseml.modifiers.second_order import SecondOrderPruningModifier
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)


@register_modifier
class FastCAPruningModifier(SecondOrderPruningModifier):
    """Layer-wise FastCAP: one shared B x B Fisher per layer and a SparseGPT-style sweep.

    Each parameter's zero-padded flattening is cut into rows of B weights that share one
    empirical Fisher F = sum_n G_n^T G_n (G_n: gradient sample n viewed as rows of B). With U the
    upper Cholesky factor of (F/m + damp * mean(diag F/m) I)^-1, columns are swept left to right:
    weights scored w^2 / U_jj^2 are removed per column block (exactly round(s * count) per block
    of ``block_size`` columns, i.e. uniform sparsity within the layer; N:M picks n per group of
    m) and each removal's error is pushed onto the columns not yet swept. Unlike the reference,
    the swept weights are written back, the sweep starts at column 0, layers whose size is not a
    multiple of B are padded, and each layer gets its own target (a dict ``final_sparsity``).

    Sample recipe::

        !FastCAPruningModifier
          params: ["re:.*(qkv|proj|fc1|fc2).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.5
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 256
          fisher_block_size: 192
          damp: 1.0e-2
          block_size: 128

    | field | paper | meaning |
    |---|---|---|
    | num_grads | m | gradient samples in the shared Fisher |
    | damp | alpha | RELATIVE dampening: alpha * mean(diag F) is added to F's diagonal |
    | fisher_block_size | B | row length sharing one Fisher (B = d_in gives SparseGPT's layout) |
    | block_size | - | columns per lazy-update block and per mask selection (None: B) |
    | mask_type | - | unstructured, or "N:M" (N pruned per M consecutive weights, B % M == 0) |
    | zero_dead | - | zero weights whose Fisher diagonal is 0, as the reference does |
    | global_sparsity | - | accepted and ignored: FastCAP is layer-wise |

    The Fisher is B x B per layer, so every rank computes every layer (the gradients are the
    same on all ranks), and the results agree without communication.
    """

    FIELDS = {
        "block_size": Field(None, optional(as_int(1)), "columns per lazy block (None: B)"),
        "zero_dead": Field(False, as_bool, "zero weights with a zero Fisher diagonal"),
        "global_sparsity": Field(False, as_bool, "ignored: FastCAP is layer-wise"),
    }

    def validate(self) -> None:
        super().validate()
        spec = self.mask_spec
        if spec.kind == "block":
            raise self.field_error("mask_type", 'must be unstructured or "N:M" for FastCAP')
        width = self._values["block_size"] or self._values["fisher_block_size"]
        if spec.kind == "nm" and min(width, self._values["fisher_block_size"]) % spec.group:
            raise self.field_error("block_size", f"must be a multiple of M = {spec.group}")

    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        super().on_initialize(module, **kwargs)
        if self.global_sparsity:
            LOG.warning("FastCAPruningModifier prunes layer by layer: global_sparsity is ignored")

    def memory_plan(self, block: int, m: int):
        """One B x B float64 Fisher per parameter, plus a chunk of gradient samples."""
        width = torch.finfo(self.work_dtype).bits // 8
        items = [
            MemoryItem("Fisher (float64)", block * block * 8, self.fisher_device(r.param))
            for r in self.refs
        ]
        chunk = min(self.GRAD_CHUNK, m) * sum(r.param.numel() for r in self.refs)
        items.append(MemoryItem("gradient chunk", chunk * width, self.refs[0].param.device))
        return items, f"fisher_block_size={block} and {len(self.refs)} parameters"

    def prune_step(self, module: nn.Module, targets: list[float]) -> None:
        if not self.refs:
            return
        devices = [self.fisher_device(r.param) for r in self.refs]
        with self.timed("curvature"):
            fishers, count = self.cached(
                "curvature",
                lambda: shared_block_fishers(
                    self.gradient_chunks(module), self.fisher_block_size, devices
                ),
            )
        bsz, spec = self.fisher_block_size, self.mask_spec
        nm = (spec.n, spec.group) if spec.kind == "nm" else (None, None)
        masks, flats = [], self.flat_weights()
        with torch.no_grad(), self.timed("pruning"):
            for i, (ref, F, target) in enumerate(zip(self.refs, fishers, targets)):
                d = ref.param.numel()
                W = to_blocks(flats[i].to(F.device), bsz)
                pruned = to_blocks((~self.masks[i].reshape(-1)).to(F.device, torch.float), bsz)
                valid = to_blocks(torch.ones(d, device=F.device), bsz) > 0
                W_new, keep = fast_cap_prune(
                    W, F, count, target, damp=self.damp, block_size=self.block_size or bsz,
                    n=nm[0], m=nm[1], valid=valid, pruned=pruned > 0, zero_dead=self.zero_dead,
                )  # fmt: skip
                self.write_weights(i, from_blocks(W_new, d))
                masks.append(from_blocks(keep, d).view(ref.param.shape))
        self.set_masks(masks)
