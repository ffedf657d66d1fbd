"""OBS scoring and the summed single-weight update from a matrix-free inverse Fisher.

Shared by M-FAC (blocked or full inverse), full WoodFisher and full WoodTaylor: given the
inverse ``H = F^-1`` over the unpruned weights of an `UnprunedLayout` (queried by ``diag()``
and ``mul(x)``, `sparseml.kernels.mfac.MFACInverse`) and an optional shift ``h`` (WoodTaylor's
``H g_bar``), with ``u = w - h``:

- scores: ``u_q^2 / (2 H_qq)`` (higher = keep), masks from ``pruner.select_masks``;
- update of the unpruned weights: ``delta = -h - H x`` with ``x_q = u_q / H_qq`` on the weights
  removed now and 0 elsewhere, the sum of the single-weight corrections; ``scale`` multiplies
  all of ``delta`` (0: scores only). Pruned weights are outside the layout: they never move.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.curvature import GradientMoments, matrix_free_inverse, tapped, unpruned_gradients
from sparseml.layouts import UnprunedLayout
from sparseml.memory import MemoryItem


def gather_layout(local: Tensor, layout: UnprunedLayout, block_size: int | None) -> Tensor:
    """Full-layout vector from this rank's columns (blocks) or rank 0's copy (full inverse:
    every rank builds the same one; rank 0's makes the results bitwise equal everywhere)."""
    if not dist.is_distributed():
        return local
    if block_size is None:
        return dist.broadcast_(local.contiguous())
    rows = dist.all_gather_shards(local.reshape(-1, block_size), layout.total // block_size)
    return rows.reshape(-1)


def full_inverse_memory(m: int, d: int, width: int, device: torch.device) -> list[MemoryItem]:
    """The full matrix-free inverse: m x d gradients (its factor overwrites them) and three
    m x m float64 matrices."""
    return [
        MemoryItem("gradients", m * d * width, device),
        MemoryItem("m x m factors", 3 * m * m * 8, device),
    ]


class FullFisherMixin:
    """One matrix-free Fisher over all unpruned selected weights (full WoodFisher/WoodTaylor):
    its memory plan, smaller settings and build. Mixed in before the pruner base."""

    def full_layout(self) -> UnprunedLayout:
        return UnprunedLayout(self.masks, None, False)

    def full_memory_plan(self, m: int) -> tuple[list[MemoryItem], str]:
        d = sum(int(k.sum()) for k in self.masks) if self.masks else 0
        width = torch.finfo(self.work_dtype).bits // 8
        device = self.fisher_device(self.refs[0].param) if self.refs else torch.device("cpu")
        items = full_inverse_memory(m, d, width, device)
        chunk = min(self.GRAD_CHUNK, m) * sum(r.param.numel() for r in self.refs) * width
        items.append(MemoryItem("gradient chunk", chunk, device))
        return items, f"num_grads={m} and {d} unpruned weights (one full Fisher)"

    def full_smaller_settings(self) -> Iterator[tuple[dict, str]]:
        """Halved num_grads (the full form's memory is m d + 3 m^2)."""
        m = self.num_grads
        while m > 1:
            m //= 2
            yield {"block": None, "m": m}, f"num_grads: {m}"

    def full_inverse(
        self, module: nn.Module, layout: UnprunedLayout, moments: GradientMoments | None = None
    ):
        """The inverse from ``num_grads`` fresh samples; ``moments`` (if given) sees the same
        samples (one pass gives the mean gradient too)."""
        chunks = self.gradient_chunks(module)
        if moments is not None:
            chunks = tapped(chunks, moments)
        device = self.fisher_device(self.refs[0].param)
        grads = unpruned_gradients(chunks, layout, self.num_grads, device, self.work_dtype)
        return matrix_free_inverse(grads, self.damp, None)


@torch.no_grad()
def matrix_free_obs_step(
    pruner,
    inv,
    layout: UnprunedLayout,
    targets: list[float],
    device: torch.device,
    *,
    block_size: int | None,
    shift: Tensor | None = None,
    move: Tensor | None = None,
    scale: float = 1.0,
) -> None:
    """One OBS step of ``pruner`` from ``inv`` (see the module docstring).

    ``pruner`` provides ``refs``, ``flat_weights()``, ``work_dtype``, ``select_masks``,
    ``write_weights`` and ``set_masks``. ``shift``: this rank's columns of ``h`` (or None);
    ``move``: what the kept weights move by in place of ``-h`` (default ``h``).
    """
    dtype = pruner.work_dtype  # never half precision: w^2 would round and near-ties flip
    weights = [w.to(device) for w in pruner.flat_weights()]
    index = [i.to(device) for i in layout.index]
    diag = gather_layout(inv.diag().to(dtype), layout, block_size)
    diag = diag.clamp_min(torch.finfo(dtype).tiny)
    h = None if shift is None else gather_layout(shift.to(device, dtype), layout, block_size)
    # u = w - h on the unpruned weights, one piece per parameter
    shifted = [w[i] for w, i in zip(weights, index)]
    if h is not None:
        shifted = [u - seg for u, seg in zip(shifted, layout.segments(h))]
    scores = []  # u^2 / (2 H_qq) on kept weights; select_masks puts -inf on the rest
    for ref, i, u, seg in zip(pruner.refs, index, shifted, layout.segments(diag)):
        score = torch.zeros(ref.param.numel(), device=device, dtype=dtype)
        score[i] = u.square() / (2 * seg)
        scores.append(score.view(ref.param.shape))
    masks = pruner.select_masks(scores, targets)
    # x = -u / diag on the weights pruned now, 0 elsewhere (and on padding)
    x = torch.zeros(layout.total, device=device, dtype=dtype)
    for u, i, mask, seg, x_seg in zip(
        shifted, index, masks, layout.segments(diag), layout.segments(x)
    ):
        drop = ~mask.reshape(-1).to(device)[i]
        x_seg.copy_(torch.where(drop, -u / seg, 0.0))
    lo, hi = layout.local
    delta = gather_layout(inv.mul(x[lo:hi]).to(dtype), layout, block_size)
    if h is not None:
        delta = delta - (
            h if move is None else gather_layout(move.to(device, dtype), layout, block_size)
        )
    for n, (w, i, seg) in enumerate(zip(weights, index, layout.segments(delta))):
        if scale != 0.0:
            w[i] += seg if scale == 1.0 else scale * seg
        pruner.write_weights(n, w)
    pruner.set_masks(masks)
