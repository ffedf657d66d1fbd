"""FastCAP's shared Fisher: one B x B Gram per parameter, shared by its rows of B weights."""

from __future__ import annotations

from typing import Any

from sparseml.curvature import shared_block_fishers
from sparseml.memory import MemoryItem
from sparseml.pruning.estimators.base import Estimator, chunk_item, peak, pruning_item


class SharedFisher(Estimator):
    """(fishers, count): per parameter the float64 (B, B) sum of G_n^T G_n over the samples
    (G_n: sample n viewed as rows of B, zero-padded), and the number of samples. Every rank
    computes every parameter's (the averaged samples are equal on all ranks)."""

    def __init__(self, block: int) -> None:
        self.block = block

    def layout(self, pruner: Any) -> None:
        return None  # rows of B consecutive weights of each whole parameter, on every rank

    def span(self, pruner: Any) -> int:
        return max((r.param.numel() for r in pruner.refs), default=1)

    def memory(self, pruner: Any, block: int, m: int) -> tuple[list[MemoryItem], str]:
        fishers = [
            MemoryItem("Fisher (float64)", block * block * 8, pruner.fisher_device(r.param))
            for r in pruner.refs
        ]
        # the sweep holds a layer's rows in float64 three times (weights, block copy, errors)
        rows = max((-(-r.param.numel() // block) * block for r in pruner.refs), default=0)
        sweep = pruning_item(pruner, extra=3 * rows * 8)
        plan = peak(fishers, [chunk_item(pruner, m)], [sweep])
        return plan, f"fisher_block_size={block} and {len(pruner.refs)} parameters"

    def smaller(self, pruner: Any):
        block, group = self.block, pruner.mask_spec.group
        while block > group:
            block = max(group, block // 2 // group * group)
            yield {"block": block, "m": pruner.num_grads}, f"fisher_block_size: {block}"

    def build(self, pruner: Any, module: Any, layout: None):
        devices = [pruner.fisher_device(r.param) for r in pruner.refs]
        return shared_block_fishers(pruner.gradient_chunks(module), self.block, devices)
