"""FLOPs-aware pruning: scores divided by (MACs per weight)^flops_power, and a MACs target
(``flops_target``) instead of a sparsity, for any pruner that declares the `FLOPS` fields.

- ``flops_power`` >= 0: per-layer score reweighting score / phi_l with
  phi_l = (MACs per weight of layer l)^flops_power, so layers that cost more per weight are
  pruned more (needs ``global_sparsity: true``: per-layer thresholds ignore a per-layer
  factor). A layer that is never run (0 MACs) counts as 1 MAC per weight.
- ``flops_target`` in (0, 1]: prune until the MACs of the kept weights of the selected layers
  are at most this fraction of their dense MACs, instead of reaching ``final_sparsity`` (give
  one of the two; ``init_sparsity`` is not used). Selection is exact and path-independent:
  the scores are sorted once over all layers and the shortest prefix whose removal reaches
  the target is pruned (`sparseml.pruning.selectors.FlopsTarget`); the update runs once, for
  that set. A gradual schedule interpolates the MACs removed from their value at the first
  pruning step to 1 - flops_target with ``inter_func``; recomputations are spaced the same
  way. ``flops_reached`` holds the MACs fraction after each step (also logged), and
  ``applied_sparsity`` the sparsities reached.

MACs per weight are measured once at initialization by one forward pass (first sample of a
grad-sampler batch, `sparseml.flops`), only when ``flops_power`` or ``flops_target`` is set.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from sparseml.fields import Check, Field, as_float, optional
from sparseml.flops import dense_macs, kept_macs, macs_per_weight
from sparseml.pruning.fields import final_sparsity, mask_spec_of
from sparseml.schedules import interpolate

LOG = logging.getLogger(__name__)

FLOPS = {
    "flops_power": Field(0.0, as_float(0.0), "scores / (MACs per weight)^flops_power"),
    "flops_target": Field(
        None, optional(as_float(0.0, 1.0, lo_open=True)), "MACs fraction to keep"
    ),
    "final_sparsity": Field(
        None, optional(final_sparsity), "sparsity at end_epoch (or use flops_target)"
    ),
}


def _uses_flops(mod: Any) -> bool:
    return mod._values["flops_target"] is not None or mod._values["flops_power"] > 0


FLOPS_CHECKS = (
    Check(
        "final_sparsity",
        lambda m: m._values["flops_target"] is None and m._values["final_sparsity"] is None,
        "is required (or set flops_target)",
    ),
    Check(
        "final_sparsity",
        lambda m: m._values["flops_target"] is not None and m._values["final_sparsity"] is not None,
        "must be left out with flops_target: give one target",
    ),
    Check(
        "init_sparsity",
        lambda m: m._values["flops_target"] is not None and m._values["init_sparsity"] != 0.0,
        "is not used with flops_target (the MACs schedule starts from the model's MACs at the "
        "first pruning step); leave it out",
    ),
    Check(
        "mask_type",
        lambda m: (
            m._values["flops_target"] is not None
            and getattr(mask_spec_of(m._values), "kind", "unstructured") != "unstructured"
        ),
        "must be unstructured with flops_target",
    ),
    Check(
        "global_sparsity",
        lambda m: _uses_flops(m) and not m._values["global_sparsity"],
        "must be true with flops_power or flops_target (one selection over all layers)",
    ),
)


class FlopsPlan:
    """MACs per weight of the selected layers and the MACs schedule of one pruner."""

    def __init__(self, module: nn.Module, pruner: Any) -> None:
        args, kw, _ = pruner.grad_sampler.example_batch()
        self.owner = type(pruner).__name__
        self.target: float | None = pruner.flops_target
        self.power: float = pruner.flops_power
        self.costs = macs_per_weight(module, pruner.refs, args, kw)
        self.sizes = [r.param.numel() for r in pruner.refs]
        self.start: float | None = None  # MACs removed when the schedule started
        self.reached: float | None = None  # MACs fraction kept after the last step
        LOG.info("%s: MACs per weight %s, dense MACs %d", self.owner, self.costs, self.dense())

    def dense(self) -> int:
        return dense_macs(self.costs, self.sizes)

    def kept_fraction(self, masks: list[Tensor]) -> float:
        """MACs of the kept weights over the dense MACs of the selected layers."""
        dense = self.dense()
        return kept_macs(self.costs, masks) / dense if dense else 1.0

    def removed_at(self, epoch: float, masks: list[Tensor], pruner: Any) -> float:
        """The fraction of dense MACs the schedule removes by ``epoch``."""
        if self.start is None:
            self.start = 1.0 - self.kept_fraction(masks)
        end = 1.0 - self.target
        return interpolate(
            epoch, pruner.start_epoch, pruner.end_epoch, self.start, end, pruner.inter_func
        )

    def after_step(self, masks: list[Tensor]) -> None:
        self.reached = self.kept_fraction(masks)
        LOG.info(
            "%s: kept MACs %.4f of dense (%d of %d)%s",
            self.owner,
            self.reached,
            kept_macs(self.costs, masks),
            self.dense(),
            "" if self.target is None else f", target {self.target:.4f}",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"flops_start": self.start, "flops_reached": self.reached}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.reached = state.get("flops_start"), state.get("flops_reached")
