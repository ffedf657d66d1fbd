"""Selectors: scores (higher = keep) and targets in, keep-masks out.

Entries already pruned carry ``-inf`` scores, so every selector prunes them first and masks
never reopen. The recipe fields choose the selector (`selector_kind`):

| kind | fields | rule |
|---|---|---|
| ``layer`` | ``global_sparsity: false`` | exactly round(s_i N_i) lowest of parameter i |
| ``global`` | ``global_sparsity: true`` | one threshold: round(s N) lowest over all parameters |
| ``block`` | ``mask_type: block4`` | groups of 4 ranked by their mean score (global or per layer) |
| ``nm`` | ``mask_type: "N:M"`` | the n lowest of every group of m consecutive entries |
| ``flops`` | ``flops_target`` | the shortest lowest-score prefix that removes the MACs asked for |

`Reweighted` divides each parameter's scores by a factor before another selector
(``flops_power``); `layer_targets` turns any selector's masks into per-parameter sparsities,
so a method that prunes layer by layer (FastCAP's sweep) can take a global allocation;
`loss_curve_targets` makes one from per-layer loss curves instead of scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparseml.errors import NumericalError, RecipeError
from sparseml.flops import macs_prefix_length
from sparseml.masks import MaskSpec, create_masks, parse_mask_type

KINDS = ("layer", "global", "block", "nm", "flops")


def selector_kind(spec: MaskSpec, global_sparsity: bool, flops_target: float | None) -> str:
    if flops_target is not None:
        return "flops"
    if spec.kind == "nm":
        return "nm"
    if spec.kind == "block":
        return "block"
    return "global" if global_sparsity else "layer"


@dataclass(frozen=True)
class Threshold:
    """Lowest scores per parameter or under one threshold; groups and N:M by ``spec``."""

    spec: MaskSpec
    global_sparsity: bool

    def select(self, scores: list[Tensor], targets: list[float]) -> list[Tensor]:
        return create_masks(scores, targets, self.spec, self.global_sparsity)


@dataclass(frozen=True)
class FlopsTarget:
    """The lowest-score prefix (pruned entries first, ties by index like
    `sparseml.masks.lowest_mask`) whose removal takes away ``targets[0]`` of the dense MACs;
    ``costs[i]`` is the MACs per weight of parameter i."""

    costs: list[int]

    def select(self, scores: list[Tensor], targets: list[float]) -> list[Tensor]:
        removed = targets[0]
        device = scores[0].device
        flat = torch.cat([s.reshape(-1).to(device, torch.float64) for s in scores])
        costs = torch.cat(
            [
                torch.full((s.numel(),), int(c), dtype=torch.int64, device=device)
                for s, c in zip(scores, self.costs)
            ]
        )
        dense = sum(int(c) * s.numel() for s, c in zip(scores, self.costs))
        # the MACs that may stay; the tiny slack absorbs 1 - (1 - t) rounding
        allowed = math.floor((1.0 - removed) * dense * (1 + 1e-12))
        order = torch.argsort(flat, stable=True)
        already = int(torch.isneginf(flat).sum())
        k = macs_prefix_length(costs, order, dense - allowed, already)
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=device)
        keep[order[:k]] = False
        sizes = [s.numel() for s in scores]
        return [k_.view(s.shape) for k_, s in zip(torch.split(keep, sizes), scores)]


@dataclass(frozen=True)
class Reweighted:
    """``inner`` on scores divided by ``factors[i]`` ** ``power`` per parameter."""

    inner: object
    factors: list[int]
    power: float

    def select(self, scores: list[Tensor], targets: list[float]) -> list[Tensor]:
        scaled = [s / float(max(c, 1)) ** self.power for s, c in zip(scores, self.factors)]
        return self.inner.select(scaled, targets)


def layer_targets(selector, scores: list[Tensor], targets: list[float]) -> list[float]:
    """Per-parameter sparsities of ``selector``'s masks: a global (or FLOPs) allocation handed
    to a method that reaches each parameter's target by itself."""
    masks = selector.select(scores, targets)
    return [1.0 - float(m.sum()) / max(m.numel(), 1) for m in masks]


def _lower_hull(x: list[float], y: list[float]) -> list[tuple[float, float]]:
    """The lower convex hull of the points (x, y), sorted by x (the lowest y at each x)."""
    hull: list[tuple[float, float]] = []
    for p in sorted(zip(x, y)):
        if hull and p[0] == hull[-1][0]:
            continue  # same x, higher (or equal) y: never on the lower hull
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] not below
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def loss_curve_targets(
    curves: list[tuple[list[float], list[float]]], sizes: list[int], total: float
) -> list[float]:
    """Per-layer sparsities that remove ``total`` entries at the least summed loss.

    curves[i] = (removed, loss): layer i's loss after removing each count of its entries
    (measured at a few sparsities; its lowest count is the least it can keep removed). Each
    curve is replaced by its lower convex hull (interpolating between the measured counts);
    removals are then taken from all layers in the order of their marginal loss per entry
    (the hulls' slopes, lowest first) until ``total`` is reached, the last step fractionally:
    the optimum of the convexified problem, where a cheap removal in one layer is never passed
    over for a dearer one in another. sizes[i] is layer i's entry count; the sparsities are
    removed / size.
    """
    if len(curves) != len(sizes):
        raise ValueError(f"one curve per layer: {len(curves)} curves, {len(sizes)} sizes")
    for i, (x, y) in enumerate(curves):
        if not len(x) or len(x) != len(y):
            raise ValueError(
                f"curve {i} must have as many losses as counts, at least one: {len(x)} counts, "
                f"{len(y)} losses"
            )
        if not all(math.isfinite(v) for v in (*x, *y)):
            raise NumericalError(f"loss curve {i} holds NaN/Inf")
    hulls = [_lower_hull(list(x), list(y)) for x, y in curves]
    removed = [h[0][0] for h in hulls]
    left = total - sum(removed)
    steps = sorted(
        ((y2 - y1) / (x2 - x1), i, k)
        for i, h in enumerate(hulls)
        for k, ((x1, y1), (x2, y2)) in enumerate(zip(h, h[1:]))
    )  # per layer, the hull's slopes grow with k, so its steps come in order
    for _, i, k in steps:
        if left <= 0:
            break
        dx = hulls[i][k + 1][0] - hulls[i][k][0]
        take = min(dx, left)
        removed[i] += take
        left -= take
    return [min(max(r / max(n, 1), 0.0), 1.0) for r, n in zip(removed, sizes)]


# ----- the recipe fields' view: which selector they ask for, and whether a method has it ------
def kind_of(mod: Any) -> str | None:
    """The selector kind a modifier's fields ask for (None while its mask_type is invalid)."""
    values = mod._values
    try:
        spec = parse_mask_type(
            values.get("mask_type", "unstructured"), values.get("n"), values.get("m")
        )
    except RecipeError:
        return None
    return selector_kind(spec, values.get("global_sparsity", False), values.get("flops_target"))


def unsupported_field(mod: Any) -> str:
    return {"flops": "flops_target", "global": "global_sparsity", "layer": "global_sparsity"}.get(
        kind_of(mod), "mask_type"
    )


def unsupported(mod: Any) -> bool:
    kind = kind_of(mod)
    return kind is not None and kind not in mod.SELECTORS


def allowed(mod: Any) -> str:
    kinds = [k for k in KINDS if k in mod.SELECTORS]
    names = {"layer": "per-layer", "global": "global", "block": "block4", "nm": "N:M"}
    allowed = ", ".join(names.get(k, "flops_target") for k in kinds)
    return f"is not supported by {type(mod).__name__}; it selects with: {allowed}"
