"""Matrix-free inverse Fishers over the unpruned weights (M-FAC, full WoodFisher, WoodTaylor).

F = damp I + G^T G / m over the d unpruned selected weights, full (one matrix over all of them)
or in blocks of B consecutive unpruned weights; never formed: `sparseml.kernels.mfac` answers
diag(F^-1) and F^-1 x from the m x d samples (full: m d + 3 m^2 memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparseml.curvature import GradientMoments, matrix_free_inverse, tapped, unpruned_gradients
from sparseml.layouts import UnprunedLayout
from sparseml.memory import MemoryItem
from sparseml.pruning.estimators.base import (
    Estimator,
    chunk_item,
    home,
    peak,
    pruning_item,
    weights_of,
    width,
)


@dataclass
class MatrixFreeEstimate:
    """The inverse (``diag()``, ``mul(x)``), its layout and device, its block size (None: full),
    and WoodTaylor's mean gradient over the layout (None when not asked for)."""

    inverse: Any
    layout: UnprunedLayout
    device: torch.device
    block: int | None
    mean: Tensor | None = None


def full_inverse_memory(m: int, d: int, size: int, device: torch.device) -> list[MemoryItem]:
    """The full matrix-free inverse: m x d gradients (its factor overwrites them) and three
    m x m float64 matrices."""
    return [
        MemoryItem("gradients", m * d * size, device),
        MemoryItem("m x m factors", 3 * m * m * 8, device),
    ]


class FullFisher(Estimator):
    """One matrix-free Fisher over every unpruned selected weight (full WoodFisher and
    WoodTaylor); ``with_mean`` also gives the mean gradient from the same samples."""

    def __init__(self, damp: float, with_mean: bool = False) -> None:
        self.damp, self.with_mean = damp, with_mean

    def layout(self, pruner: Any) -> UnprunedLayout:
        return UnprunedLayout(pruner.masks, None, False)

    def span(self, pruner: Any) -> int:
        return sum(r.param.numel() for r in pruner.refs) or 1

    def memory(self, pruner: Any, block: int | None, m: int) -> tuple[list[MemoryItem], str]:
        d = sum(int(k.sum()) for k in pruner.masks) if pruner.masks else 0
        device = home(pruner)
        chunk = chunk_item(pruner, m)
        sampling = [MemoryItem(chunk.what, chunk.nbytes, device)]
        if self.with_mean:
            sampling.append(MemoryItem("gradient moments", 2 * weights_of(pruner) * 8, device))
        plan = peak(
            full_inverse_memory(m, d, width(pruner), device), sampling, [pruning_item(pruner)]
        )
        return plan, f"num_grads={m} and {d} unpruned weights (one full Fisher)"

    def smaller(self, pruner: Any) -> Iterator[tuple[dict, str]]:
        """Halved num_grads (the full form's memory is m d + 3 m^2)."""
        m = pruner.num_grads
        while m > 1:
            m //= 2
            yield {"block": None, "m": m}, f"num_grads: {m}"

    def build(self, pruner: Any, module: Any, layout: UnprunedLayout) -> MatrixFreeEstimate:
        device = home(pruner)
        chunks = pruner.gradient_chunks(module)
        moments = None
        if self.with_mean:
            sizes = [r.param.numel() for r in pruner.refs]
            moments = GradientMoments(sizes, pruner.refs[0].param.device)
            chunks = tapped(chunks, moments)
        grads = unpruned_gradients(chunks, layout, pruner.num_grads, device, pruner.work_dtype)
        inverse = matrix_free_inverse(grads, self.damp, None)
        mean = None
        if moments is not None:
            g_bar = torch.zeros(1, layout.total, dtype=pruner.work_dtype, device=device)
            layout.fill(g_bar, [g.reshape(1, -1) for g in moments.mean()])
            mean = g_bar[0]
        return MatrixFreeEstimate(inverse, layout, device, None, mean)


class MFACFisher(Estimator):
    """M-FAC's inverse: blocks of ``block`` consecutive unpruned weights per parameter (or of
    the concatenation, ``cross_layers``), or full (``block`` None); from ``num_grads`` fresh
    samples, or from the ``buffer`` of training gradients (`TrainingGradients`, on
    ``buffer_device``) when ``buffered``."""

    def __init__(
        self,
        damp: float,
        block: int | None,
        num_pages: int,
        cross_layers: bool,
        num_grads: int,
        device: torch.device,
        buffered: bool = False,
        buffer: Any = None,
        buffer_device: torch.device | None = None,
    ) -> None:
        self.damp, self.block, self.num_pages = damp, block, num_pages
        self.cross_layers, self.num_grads, self.device = cross_layers, num_grads, device
        self.buffered, self.buffer, self.buffer_device = buffered, buffer, buffer_device

    def layout(self, pruner: Any) -> UnprunedLayout:
        # buffered gradients were laid out with the masks of their time (a superset of the
        # current ones: entries pruned since then have zero gradient and zero weight)
        if self.buffer is not None and self.buffer.layout is not None:
            return self.buffer.layout
        return UnprunedLayout(pruner.masks, self.block, self.cross_layers)

    def span(self, pruner: Any) -> int:
        sizes = [r.param.numel() for r in pruner.refs]
        return sum(sizes) if self.cross_layers else max(sizes, default=1)

    def memory(self, pruner: Any, block: int | None, m: Any) -> tuple[list[MemoryItem], str]:
        """Gradients (m x unpruned weights per rank), the buffer, and the inverse's factors."""
        m = m if isinstance(m, int) else max(m.values())
        lo, hi = UnprunedLayout(pruner.masks, block, self.cross_layers).local
        d, size, device = hi - lo, width(pruner), self.device
        items, sampling = [], []
        if self.buffered:
            items.append(MemoryItem("gradient buffer", m * d * size, self.buffer_device))
        else:  # the samples stream in chunks of whole gradients
            sampling.append(chunk_item(pruner, m))
        if not self.buffered or self.buffer_device != device:
            items.append(MemoryItem("gradients", m * d * size, device))
        if block is None:  # Z overwrites the gradients; A and its factors are m x m float64
            items.append(full_inverse_memory(m, d, size, device)[1])
        elif block < m:
            items.append(MemoryItem("Fisher blocks", -(-d // block) * block * block * size, device))
        else:
            items.append(MemoryItem("Z factors", m * d * size, device))
        plan = peak(items, sampling, [pruning_item(pruner)])
        return plan, f"num_grads={m}, fisher_block_size={block} and {d} unpruned weights"

    def smaller(self, pruner: Any) -> Iterator[tuple[dict, str]]:
        """Halved num_grads (the memory grows with it; the block size matters less); a
        ``{sparsity: m}`` schedule is scaled as a whole, so the suggestion keeps its shape."""
        given = pruner.num_grads
        schedule = given if isinstance(given, dict) else {0.0: given}
        scale = 1
        while max(schedule.values()) // (2 * scale) >= 1:
            scale *= 2
            smaller = {k: max(1, v // scale) for k, v in schedule.items()}
            text = smaller[0.0] if len(smaller) == 1 else smaller
            yield {"block": self.block, "m": smaller}, f"num_grads: {text}"

    def build(self, pruner: Any, module: Any, layout: UnprunedLayout) -> MatrixFreeEstimate:
        if self.buffer is not None:
            grads = self.buffer.take(pruner, self.num_grads).to(self.device)
        else:
            chunks = pruner.gradient_chunks(module, self.num_grads)
            grads = unpruned_gradients(
                chunks, layout, self.num_grads, self.device, pruner.work_dtype
            )
        inverse = matrix_free_inverse(grads, self.damp, self.block, self.num_pages)
        return MatrixFreeEstimate(inverse, layout, self.device, self.block)
