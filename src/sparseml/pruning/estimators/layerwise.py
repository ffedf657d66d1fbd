"""Per-layer estimates, one part per whole parameter (`sparseml.layouts.LayerLayout`): K-FAC
factors, the diagonal empirical Fisher, gradient sums and the Hessian diagonal."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from sparseml.curvature import (
    GradientMoments,
    damped_inverses,
    gradient_sums,
    hessian_diagonal,
    kfac_factors,
    probe_seed,
    rademacher_probes,
    unit_vectors,
)
from sparseml.curvature.kfac import KFACFactors
from sparseml.curvature.moments import SLICE_NUMEL
from sparseml.dist import on_all_ranks
from sparseml.layouts import LayerLayout
from sparseml.memory import MemoryItem
from sparseml.pruning.estimators.base import (
    Estimator,
    chunk_item,
    peak,
    pruning_item,
    weights_of,
    width,
)

LOG = logging.getLogger(__name__)
EXACT_WARN_WEIGHTS = 20_000  # exact Hessian diagonal: one double backward per weight and batch


def _layers(pruner: Any) -> LayerLayout:
    return LayerLayout([r.param.numel() for r in pruner.refs])


def _per_weight(pruner: Any, per_weight: list[tuple[str, int]]) -> list[MemoryItem]:
    """Memory items of per-weight vectors: (label, bytes per weight) each, on the params'."""
    d = weights_of(pruner)
    device = pruner.refs[0].param.device if pruner.refs else torch.device("cpu")
    return [MemoryItem(label, d * nbytes, device) for label, nbytes in per_weight]


def _streamed(pruner: Any, m: int) -> list[MemoryItem]:
    """A chunk of samples and the float64 column slices reduced out of it."""
    chunk = chunk_item(pruner, m)
    return [chunk, MemoryItem("float64 column slices", 2 * SLICE_NUMEL * 8, chunk.device)]


class KFAC(Estimator):
    """Per layer the damped inverse Kronecker factors G^-1 and A^-1 (`sparseml.curvature.kfac`)."""

    def __init__(self, damp: float) -> None:
        self.damp = damp

    def layout(self, pruner: Any) -> LayerLayout:
        return _layers(pruner)

    def memory(self, pruner: Any, block: int | None, m: int) -> tuple[list[MemoryItem], str]:
        """The inverse factors; building holds the sums and their averages too (and one
        factor's Cholesky), pruning a layer's float64 score and update temporaries."""
        shapes = [
            (r.param.shape[0], r.param.numel() // max(r.param.shape[0], 1)) for r in pruner.refs
        ]
        factors = sum(8 * (out**2 + inp**2) for out, inp in shapes)
        widest = max((max(out, inp) ** 2 for out, inp in shapes), default=0)
        layer = max((r.param.numel() for r in pruner.refs), default=0)
        device = pruner.refs[0].param.device if pruner.refs else torch.device("cpu")
        plan = peak(
            [MemoryItem("K-FAC inverse factors (float64)", factors, device)],
            [MemoryItem("K-FAC factor sums and averages", 2 * factors + 2 * 8 * widest, device)],
            [pruning_item(pruner, extra=2 * 8 * layer)],
        )
        return plan, f"the layer sizes of {len(pruner.refs)} parameters"

    def build(self, pruner: Any, module: Any, layout: LayerLayout) -> list[KFACFactors]:
        layers = [r.module for r in pruner.refs]
        stats = pruner.grad_sampler.iter_layer_stats(
            module,
            layers,
            pruner.num_grads,
            desc=f"{type(pruner).__name__} layer statistics",
            dtype=pruner.work_dtype,
        )
        factors = kfac_factors(stats, layers)
        return on_all_ranks(
            lambda: [damped_inverses(*factors[p.index], self.damp) for p in layout.parts],
            type(pruner).__name__,
        )


class DiagonalFisher(Estimator):
    """Per layer diag(F) = (1/m) sum g^2 of the masked gradient samples."""

    def layout(self, pruner: Any) -> LayerLayout:
        return _layers(pruner)

    def memory(self, pruner: Any, block: int | None, m: int) -> tuple[list[MemoryItem], str]:
        sums = _per_weight(pruner, [("diagonal Fisher sums (float64)", 16)])
        return peak(sums, _streamed(pruner, m), [pruning_item(pruner)]), f"num_grads={m}"

    def build(self, pruner: Any, module: Any, layout: LayerLayout) -> list[Tensor]:
        device = pruner.refs[0].param.device
        moments = GradientMoments([r.param.numel() for r in pruner.refs], device)
        for chunk in pruner.gradient_chunks(module):
            moments.add(chunk)
            del chunk  # not alive while the next chunk is drawn
        return layout.take(moments.diagonal_fisher())


class GradientSums(Estimator):
    """Per layer the float64 sum over the samples of g (or of |g| with ``absolute``)."""

    def __init__(self, absolute: bool) -> None:
        self.absolute = absolute

    def layout(self, pruner: Any) -> LayerLayout:
        return _layers(pruner)

    def memory(self, pruner: Any, block: int | None, m: int) -> tuple[list[MemoryItem], str]:
        sums = _per_weight(pruner, [("gradient sums (float64)", 8)])
        plan = peak(sums, _streamed(pruner, m), [pruning_item(pruner)])
        return plan, f"num_grads={m} and {weights_of(pruner)} weights"

    def build(self, pruner: Any, module: Any, layout: LayerLayout) -> list[Tensor]:
        sizes = [r.param.numel() for r in pruner.refs]
        sums = gradient_sums(
            pruner.gradient_chunks(module),
            sizes,
            pruner.refs[0].param.device,
            absolute=self.absolute,
        )
        return layout.take(sums)


class HessianDiagonal(Estimator):
    """Per layer diag(H) of the mini-batch loss, averaged over ``num_grads`` batches: by
    Hutchinson probes (``method: hutchinson``) or every H e_q (``exact``)."""

    def __init__(self, method: str) -> None:
        self.method = method

    def layout(self, pruner: Any) -> LayerLayout:
        return _layers(pruner)

    def memory(self, pruner: Any, block: int | None, m: int) -> tuple[list[MemoryItem], str]:
        """The float64 sums; per batch about 6 widths + 8 bytes per weight (the gradients
        with their graph, the double-backward's product and temporaries, the probe, the float64
        terms v * Hv); and, one layer at a time, its probe drawn as int64 and the float64
        copies its terms are made from (32 bytes per weight of the largest layer). Measured
        peaks (`tests/memory_probe.py`, float32, nine runs each; they move with the
        allocator's reuse of freed blocks): one layer 63-75 bytes per weight (figure 72), two
        equal layers 48-61 (figure 56)."""
        sums = _per_weight(pruner, [("Hessian diagonal sums (float64)", 8)])
        batch = _per_weight(pruner, [("gradient, probe, products, terms", 6 * width(pruner) + 8)])
        layer = max((r.param.numel() for r in pruner.refs), default=0)
        batch.append(MemoryItem("one layer's probe draw and terms", 32 * layer, batch[0].device))
        return peak(sums, batch, [pruning_item(pruner)]), "the selected weights"

    def build(self, pruner: Any, module: Any, layout: LayerLayout) -> list[Tensor]:
        params = [r.param for r in pruner.refs]
        sizes = [p.numel() for p in params]
        devices = [p.device for p in params]
        dtype = pruner.work_dtype
        if self.method == "exact":
            if sum(sizes) > EXACT_WARN_WEIGHTS:
                LOG.warning(
                    "%s: hessian_method exact runs %d double-backward passes per batch (one "
                    "per selected weight); hutchinson runs one",
                    type(pruner).__name__,
                    sum(sizes),
                )
            vectors = unit_vectors(sizes, devices, dtype)
        else:
            seed = probe_seed(pruner.grad_sampler.state_dict())
            vectors = rademacher_probes(sizes, devices, dtype, seed)
        pairs = pruner.grad_sampler.iter_hessian_products(
            module,
            params,
            pruner.num_grads,
            vectors,
            desc=f"{type(pruner).__name__} Hessian-vector products",
            dtype=dtype,
        )
        return layout.take(hessian_diagonal(pairs, sizes, pruner.num_grads))
