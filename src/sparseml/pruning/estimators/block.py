"""Block-diagonal inverse empirical Fishers: OBS's, CAP's (with its elimination) and
WoodTaylor's (with the mean gradient).

Per parameter, blocks of B consecutive flattened weights (the last one zero-padded), or with
``dynamic`` B consecutive *unpruned* weights (`sparseml.layouts.CompactLayout`); the blocks of
all parameters are dealt to the ranks. H_b = (damp I + G_b^T G_b / m)^-1 from a float64 Gram
(m >= B) or in the m-dimensional sample space (m < B, exact for any damp); the Grams and then
the inverses are kept as float64 lower triangles (`sparseml.kernels.packed.SymBlocks`), which
is exact and takes (B + 1) / B times the memory of float32 blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sparseml.curvature import GradientMoments, block_fisher_inverses, tapped
from sparseml.curvature.moments import SLICE_NUMEL
from sparseml.dist import is_distributed, on_all_ranks
from sparseml.kernels import native
from sparseml.kernels.cap import cap_eliminate_factored, workspace_bytes
from sparseml.kernels.chunking import chunk_blocks
from sparseml.kernels.fisher import to_blocks
from sparseml.kernels.packed import packed_numel
from sparseml.layouts import BlockLayout, CompactLayout
from sparseml.memory import MemoryItem
from sparseml.progress import Progress
from sparseml.pruning.estimators.base import (
    GRAD_CHUNK,
    Estimator,
    chunk_item,
    home,
    peak,
    pruning_item,
    width,
)


class BlockFisher(Estimator):
    """H (n_b, B, B) per part of this rank's blocks."""

    def __init__(self, block: int, damp: float, dynamic: bool = False) -> None:
        self.block, self.damp, self.dynamic = block, damp, dynamic

    def layout(self, pruner: Any) -> BlockLayout | CompactLayout:
        if self.dynamic:
            return CompactLayout(pruner.masks, self.block)
        return BlockLayout([r.param.numel() for r in pruner.refs], self.block)

    def span(self, pruner: Any) -> int:
        return max((r.param.numel() for r in pruner.refs), default=1)

    def sizes(self, pruner: Any) -> list[int]:
        """Weights the blocks cover per parameter (dynamic: the unpruned ones)."""
        if self.dynamic and pruner.masks:
            return [int(m.sum()) for m in pruner.masks]
        return [r.param.numel() for r in pruner.refs]

    def memory(self, pruner: Any, block: int, m: int) -> tuple[list[MemoryItem], str]:
        blocks, sampling, inverting = self.phases(pruner, block, m)
        plan = peak([blocks], sampling, inverting, [pruning_item(pruner)])
        return plan, self.drivers(pruner, block, m)

    def drivers(self, pruner: Any, block: int, m: int) -> str:
        return f"fisher_block_size={block}, num_grads={m} and {sum(self.sizes(pruner))} weights"

    def phases(
        self, pruner: Any, block: int, m: int
    ) -> tuple[MemoryItem, list[MemoryItem], list[MemoryItem]]:
        """This rank's blocks, and what drawing the samples and inverting hold besides them."""
        sizes = self.sizes(pruner)
        layout = BlockLayout(sizes, block)
        n_local = sum(p.b1 - p.b0 for p in layout.parts)
        d_local = sum(p.c1 - p.c0 for p in layout.parts)
        size, device = width(pruner), home(pruner)
        # a chunk holds whole gradients (dynamic blocks compact them only afterwards)
        chunk = chunk_item(pruner, m)
        # packed float64 lower triangles: the Grams, then H in their place
        blocks = MemoryItem(
            "Fisher blocks (float64 triangles)", n_local * packed_numel(block) * 8, device
        )
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        n_b = max(1, n_local)

        def batches(per_block: int, numel: int) -> MemoryItem:
            """float64 working batches of the inversion, one per thread in flight (measured
            per block: the unpacked block, the factorization's and the packing's copies)."""
            n = min(chunk_blocks(numel, device), -(-n_b // threads))
            return MemoryItem("Fisher inversion batches", min(threads, n_b) * n * per_block, device)

        if m < block:  # sample-space form: the sampled chunks are kept until H is built
            sampling = [MemoryItem("sampled gradients", m * d_local * size, device)]
            if is_distributed():  # this rank's columns are copied out of each chunk
                sampling.append(chunk)
            per_block = (3 * block * block + 3 * m * block) * 8
            return blocks, sampling, [sampling[0], batches(per_block, block * max(block, m))]
        sampling = [chunk]
        if self.dynamic:  # the unpruned columns are gathered out of each chunk
            sampling.append(MemoryItem("unpruned columns of the chunk", chunk.nbytes, device))
        # per worker thread, a float64 slice of the chunk, its products and their triangles
        c = min(GRAD_CHUNK, m)
        per_slice = min(chunk_blocks(2 * block * max(block, c), device), -(-n_b // threads))
        slices = per_slice * (c * block + block * block + packed_numel(block)) * 8
        in_flight = min(threads, n_b)
        sampling.append(MemoryItem("float64 Gram slices", in_flight * slices, device))
        inverting = [batches(int(3.5 * block * block * 8), block * block)]
        if native.ENABLED and device.type == "cpu":  # the last chunk is added while inverting
            inverting.append(chunk)
        return blocks, sampling, inverting

    def smaller(self, pruner: Any) -> Iterator[tuple[dict, str]]:
        """Halved block sizes, down to the mask group."""
        block, group = self.block, pruner.mask_spec.group
        while block > group:
            block = max(group, block // 2 // group * group)
            yield {"block": block, "m": pruner.num_grads}, f"fisher_block_size: {block}"

    def inverses(self, pruner: Any, chunks, layout) -> list[torch.Tensor]:
        return block_fisher_inverses(
            chunks,
            layout,
            num_grads=pruner.num_grads,
            damp=self.damp,
            devices=[pruner.fisher_device(r.param) for r in pruner.refs],
            dtype=pruner.work_dtype,
            owner=type(pruner).__name__,
        )

    def build(self, pruner: Any, module: Any, layout) -> list[torch.Tensor]:
        return self.inverses(pruner, self.chunks(pruner, module), layout)

    def chunks(self, pruner: Any, module: Any):
        """The gradient chunks; the Gram path (m >= B) keeps nothing of them, so the sampler
        may write every chunk into the same buffers."""
        return pruner.gradient_chunks(module, reuse=pruner.num_grads >= self.block)


class BlockFisherAndMean(BlockFisher):
    """Per part (H, g_bar piece): the block inverses and the mean gradient, from one pass."""

    def memory(self, pruner: Any, block: int, m: int) -> tuple[list[MemoryItem], str]:
        blocks, sampling, inverting = self.phases(pruner, block, m)
        d = sum(r.param.numel() for r in pruner.refs)  # the float64 sums of g and g^2
        moments = MemoryItem("gradient moments", 2 * d * 8, pruner.refs[0].param.device)
        slices = MemoryItem("float64 column slices", 2 * SLICE_NUMEL * 8, moments.device)
        plan = peak([blocks, moments], [*sampling, slices], inverting, [pruning_item(pruner)])
        return plan, self.drivers(pruner, block, m)

    def build(self, pruner: Any, module: Any, layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
        moments = GradientMoments(
            [r.param.numel() for r in pruner.refs], pruner.refs[0].param.device
        )
        inverses = self.inverses(pruner, tapped(self.chunks(pruner, module), moments), layout)
        pieces = layout.take([g.to(pruner.work_dtype) for g in moments.mean()])
        return list(zip(inverses, pieces))


class CAPElimination(BlockFisher):
    """Per part: H, the blocks (W, valid) and, for unstructured masks, CAP's greedy
    elimination order with its cumulative losses (`sparseml.kernels.cap.cap_eliminate_factored`):
    on the compiled CPU path H's rows of the ``replay`` blocks then hold the elimination's
    factors, from which any prefix's weights are replayed (``pre``: the coordinates removed
    before it).

    The order depends on the weights, masks and H only, so a sweep over sparsities reuses it.
    Memory: the blocks, the (n_b, B) order, losses and ``pre``, and the elimination's float64
    working batches (one per CPU thread in flight).
    """

    def __init__(
        self, block: int, damp: float, nm: bool, blocks_per_batch: int | None, per_step=False
    ) -> None:
        super().__init__(block, damp)
        self.nm, self.blocks_per_batch, self.per_step = nm, blocks_per_batch, per_step

    def memory(self, pruner: Any, block: int, m: int) -> tuple[list[MemoryItem], str]:
        """The blocks and CAP's per-weight arrays, plus the largest phase: drawing samples,
        the elimination (and reconstruction) working batches, or the pruning step."""
        blocks, sampling, inverting = self.phases(pruner, block, m)
        layout = BlockLayout(self.sizes(pruner), block)
        n_local = sum(p.b1 - p.b0 for p in layout.parts)
        device = home(pruner)
        weights = n_local * block * (width(pruner) + 1 + (0 if self.nm else 7))
        arrays = MemoryItem("CAP blocks, order and losses", weights, device)
        # every block has the same work (one batch is a slice of H) when the model is dense
        # and no parameter ends in a padded block
        sizes = self.sizes(pruner)
        even = all(n % block == 0 for n in sizes) and all(bool(m.all()) for m in pruner.masks)
        targets = [t for t in pruner.final_targets if isinstance(t, float)]
        sparsity = max(targets) if targets else 0.95  # a MACs target: assume the worst
        work = workspace_bytes(n_local, block, self.blocks_per_batch, device, not even, sparsity)
        elimination = [MemoryItem("CAP elimination workspace (float64)", work, device)]
        plan = peak([blocks, arrays], sampling, inverting, elimination, [pruning_item(pruner)])
        return plan, self.drivers(pruner, block, m)

    def build(self, pruner: Any, module: Any, layout) -> list[dict[str, torch.Tensor]]:
        inverses = super().build(pruner, module, layout)
        weights = layout.take(pruner.flat_weights())
        kept = layout.take([m.reshape(-1) for m in pruner.masks])
        bsz = self.block

        def eliminate() -> list[dict[str, torch.Tensor]]:
            out = []
            total = 0 if self.nm else sum(H.shape[0] for H in inverses)
            progress = Progress(f"{type(pruner).__name__}: CAP elimination", total, "blocks")
            for w, k, H in zip(weights, kept, inverses):
                # a copy in the work dtype: a sweep prunes the model while the estimate is reused
                W = to_blocks(w.to(H.device), bsz).clone()
                valid = to_blocks(torch.ones(w.numel(), device=H.device), bsz) > 0
                est = {"H": H, "W": W, "valid": valid}
                if not self.nm:  # H's rows of the "replay" blocks become their factors
                    pruned = to_blocks((~k).to(H.device, torch.float32), bsz) > 0
                    est["order"], est["losses"], est["replay"] = cap_eliminate_factored(
                        W, H, pruned, valid=valid, blocks_per_batch=self.blocks_per_batch,
                        on_blocks=progress.update, per_step=self.per_step,
                    )  # fmt: skip
                    est["pre"] = pruned | ~valid
                out.append(est)
            progress.close()
            return out

        return on_all_ranks(eliminate, type(pruner).__name__)
