"""Fields and behaviour shared by the OBS family (OBS, WoodFisher, WoodTaylor).

Fields (the WoodFisher repository's options, spec section 7):

- ``scale_prune_update`` in [0, 1]: the share of the OBS update applied (0: OBD, scores
  only, the kept weights do not move; 1: the full update).
- ``flops_power`` >= 0: per-layer score reweighting score / phi_l with
  phi_l = (MACs per weight of layer l)^flops_power, so layers that cost more per weight are
  pruned more (needs ``global_sparsity: true``; per-layer thresholds ignore a per-layer
  factor). A layer that is never run (0 MACs) counts as 1 MAC per weight.
- ``flops_target`` in (0, 1]: prune until the MACs of the kept weights of the selected
  layers are at most this fraction of their dense MACs, instead of reaching
  ``final_sparsity`` (give one of the two; ``init_sparsity`` is not used). Selection is exact
  and path-independent (spec W4 fixed): the scores are sorted once over all layers and the
  shortest prefix whose removal reaches the target is pruned; the update runs once, for that
  set. A gradual schedule interpolates the MACs removed from their value at the first
  pruning step to 1 - flops_target with ``inter_func``; recomputations are spaced the same
  way. ``flops_reached`` holds the MACs fraction after each step (also logged), and
  ``applied_sparsity`` the sparsities reached.
- ``dynamic_blocks`` (OBS and blockwise WoodTaylor): Fisher blocks of B consecutive
  *unpruned* weights (`sparseml.layouts.CompactLayout`), spec 7.5. At sparsity s the Fisher
  holds (1 - s) of the static blocks: at 90% sparsity a tenth of the memory and of the
  Gram/Cholesky work. Since masks start dense, the first pruning step of a modifier needs the
  static amount (the memory check plans for it); later steps of a gradual run shrink.

MACs per weight are measured once at initialization by one forward pass (first sample of a
grad-sampler batch, `sparseml.flops`), only when ``flops_power`` or ``flops_target`` is set.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from sparseml.fields import Field, as_bool, as_float, optional
from sparseml.flops import dense_macs, kept_macs, macs_per_weight, macs_prefix_length
from sparseml.layouts import CompactLayout
from sparseml.modifiers.pruning import _final_sparsity
from sparseml.schedules import interpolate

LOG = logging.getLogger(__name__)

OBS_FAMILY_FIELDS = {
    "scale_prune_update": Field(1.0, as_float(0.0, 1.0), "share of the OBS update (0: OBD)"),
    "flops_power": Field(0.0, as_float(0.0), "scores / (MACs per weight)^flops_power"),
    "flops_target": Field(
        None, optional(as_float(0.0, 1.0, lo_open=True)), "MACs fraction to keep"
    ),
    "final_sparsity": Field(
        None, optional(_final_sparsity), "sparsity at end_epoch (or use flops_target)"
    ),
}
DYNAMIC_BLOCKS_FIELDS = {
    "dynamic_blocks": Field(False, as_bool, "Fisher blocks over unpruned weights only"),
}


class OBSFamilyMixin:
    """FLOPs reweighting and targets, dynamic blocks; mixed in before the pruner base."""

    def reset_state(self) -> None:
        super().reset_state()
        self.macs_per_weight: list[int] | None = None
        self.flops_start: float | None = None  # MACs removed when the schedule started
        self.flops_reached: float | None = None  # MACs fraction kept after the last step

    def validate(self) -> None:
        super().validate()
        values = self._values
        target = values["flops_target"]
        if target is None and values["final_sparsity"] is None:
            raise self.field_error("final_sparsity", "is required (or set flops_target)")
        if target is not None:
            if values["final_sparsity"] is not None:
                raise self.field_error(
                    "final_sparsity", "must be left out with flops_target: give one target"
                )
            if values["init_sparsity"] != 0.0:
                raise self.field_error(
                    "init_sparsity",
                    "is not used with flops_target (the MACs schedule starts from the model's "
                    "MACs at the first pruning step); leave it out",
                )
            if self.mask_spec.kind != "unstructured":
                raise self.field_error("mask_type", "must be unstructured with flops_target")
        uses_flops = target is not None or values["flops_power"] > 0
        if uses_flops and not values["global_sparsity"]:
            raise self.field_error(
                "global_sparsity",
                "must be true with flops_power or flops_target (one selection over all layers)",
            )
        if values.get("dynamic_blocks"):
            if values.get("fisher_block_size", 0) is None:
                raise self.field_error("dynamic_blocks", "needs a fisher_block_size (blockwise)")
            if self.mask_spec.kind != "unstructured":
                raise self.field_error("dynamic_blocks", "needs mask_type: unstructured")

    @property
    def uses_flops(self) -> bool:
        return self.flops_target is not None or self.flops_power > 0

    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        super().on_initialize(module, **kwargs)
        if self.uses_flops:
            args, kw, _ = self.grad_sampler.example_batch()
            self.macs_per_weight = macs_per_weight(module, self.refs, args, kw)
            LOG.info(
                "%s: MACs per weight %s, dense MACs %d",
                type(self).__name__,
                self.macs_per_weight,
                self.dense_macs(),
            )

    # ----- MACs ---------------------------------------------------------------------------------
    def dense_macs(self) -> int:
        return dense_macs(self.macs_per_weight, [r.param.numel() for r in self.refs])

    def macs_fraction(self) -> float:
        """MACs of the kept weights over the dense MACs of the selected layers."""
        dense = self.dense_macs()
        return kept_macs(self.macs_per_weight, self.masks) / dense if dense else 1.0

    def schedule_levels(self) -> list[float]:
        if self.flops_target is None:
            return super().schedule_levels()
        return [1.0 - self.macs_fraction()] * len(self.refs)

    def targets_for_epoch(self, epoch: float) -> list[float]:
        """Sparsities, or with ``flops_target`` the fraction of dense MACs to remove."""
        if self.flops_target is None:
            return super().targets_for_epoch(epoch)
        if self.flops_start is None:
            self.flops_start = 1.0 - self.macs_fraction()
        end = 1.0 - self.flops_target
        removed = interpolate(
            epoch, self.start_epoch, self.end_epoch, self.flops_start, end, self.inter_func
        )
        return [removed] * len(self.refs)

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        if self.macs_per_weight is None:
            return
        self.flops_reached = self.macs_fraction()
        if self.flops_target is not None:
            self.applied_sparsity = self.current_sparsities()
        LOG.info(
            "%s: kept MACs %.4f of dense (%d of %d)%s",
            type(self).__name__,
            self.flops_reached,
            kept_macs(self.macs_per_weight, self.masks),
            self.dense_macs(),
            "" if self.flops_target is None else f", target {self.flops_target:.4f}",
        )

    # ----- selection ----------------------------------------------------------------------------
    def select_masks(self, scores: list[Tensor], targets: list[float]) -> list[Tensor]:
        if self.flops_power > 0:
            scores = [
                s / float(max(c, 1)) ** self.flops_power
                for s, c in zip(scores, self.macs_per_weight)
            ]
        if self.flops_target is None:
            return super().select_masks(scores, targets)
        return self._flops_masks(self.masked_scores(scores), targets[0])

    def _flops_masks(self, scores: list[Tensor], removed: float) -> list[Tensor]:
        """The lowest-score prefix (pruned entries first) that removes ``removed`` of the
        dense MACs; ties broken by index, like `sparseml.masks.lowest_mask`."""
        device = scores[0].device
        flat = torch.cat([s.reshape(-1).to(device, torch.float64) for s in scores])
        costs = torch.cat(
            [
                torch.full((s.numel(),), int(c), dtype=torch.int64, device=device)
                for s, c in zip(scores, self.macs_per_weight)
            ]
        )
        dense = self.dense_macs()
        # the MACs that may stay; the tiny slack absorbs 1 - (1 - t) rounding
        allowed = math.floor((1.0 - removed) * dense * (1 + 1e-12))
        order = torch.argsort(flat, stable=True)
        already = int(torch.isneginf(flat).sum())
        k = macs_prefix_length(costs, order, dense - allowed, already)
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=device)
        keep[order[:k]] = False
        return [
            k_.view(s.shape)
            for k_, s in zip(torch.split(keep, [s.numel() for s in scores]), scores)
        ]

    # ----- dynamic blocks -----------------------------------------------------------------------
    def block_layout(self):
        if getattr(self, "dynamic_blocks", False):
            return CompactLayout(self.masks, self.fisher_block_size)
        return super().block_layout()

    def block_sizes(self) -> list[int]:
        if getattr(self, "dynamic_blocks", False) and self.masks:
            return [int(m.sum()) for m in self.masks]
        return super().block_sizes()

    # ----- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["flops_start"], state["flops_reached"] = self.flops_start, self.flops_reached
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.flops_start = state.get("flops_start")
        self.flops_reached = state.get("flops_reached")
