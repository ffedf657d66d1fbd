"""Magnitude pruning (gradual, per layer or global) and constant (frozen-mask) pruning.

Gradual magnitude pruning follows "To prune, or not to prune: exploring the efficacy of pruning
for model compression" (Zhu & Gupta, arXiv 1710.01878): at each update the weights with the
smallest |w| are pruned to the scheduled sparsity.

Sample recipe::

    pruning_modifiers:
      - !GlobalMagnitudePruningModifier
        params: ["re:.*blocks.*(qkv|proj|fc1|fc2).weight"]
        init_sparsity: 0.4
        final_sparsity: 0.9
        start_epoch: 0
        end_epoch: 40
        update_frequency: 5
        inter_func: cubic
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sparseml.fields import Check, Field, as_bool, as_str_list, one_of
from sparseml.modifiers.base import epoch_field
from sparseml.pruning.modifier import PruningModifier
from sparseml.registry import register_modifier


@register_modifier
class GMPruningModifier(PruningModifier):
    """Gradual magnitude pruning; per layer unless ``global_sparsity: true``."""

    FIELDS = {
        "phased": Field(False, as_bool, "unsupported; must be false"),
        "score_type": Field("magnitude", one_of("magnitude"), "only magnitude is supported"),
    }
    CHECKS = (Check("phased", lambda m: m._values["phased"], "is not supported; use false"),)


@register_modifier
class MagnitudePruningModifier(PruningModifier):
    """Gradual magnitude pruning with one threshold per parameter tensor."""

    CHECKS = (
        Check(
            "global_sparsity",
            lambda m: m._values["global_sparsity"],
            "must be false; use GlobalMagnitudePruningModifier",
        ),
    )


@register_modifier
class GlobalMagnitudePruningModifier(PruningModifier):
    """Gradual magnitude pruning with one threshold over all selected parameters."""

    FIELDS = {"global_sparsity": Field(True, as_bool, "always true for this modifier")}
    CHECKS = (
        Check(
            "global_sparsity",
            lambda m: not m._values["global_sparsity"],
            "must be true; use MagnitudePruningModifier",
        ),
    )


@register_modifier
class ConstantPruningModifier(PruningModifier):
    """Freezes the current zero pattern of ``params`` between ``start_epoch`` and ``end_epoch``.

    The mask is ``param != 0`` taken when the modifier starts and enforced like any pruning
    mask (forward pre-hooks, gradient hooks, re-application after each step); at ``end_epoch``
    the hooks are removed. Taking the pattern once (instead of at every step) costs nothing per
    step and cannot freeze a weight that crosses zero by chance. Its ``applied_sparsity`` is
    the sparsity of the frozen masks.
    """

    FIELDS = {
        "params": Field(["__ALL_PRUNABLE__"], as_str_list, "names or re:<regex>"),
        "update_frequency": Field(-1.0, lambda v: -1.0, "ignored: masks follow every step"),
        "start_epoch": epoch_field(),
        "end_epoch": epoch_field(),
    }
    WITHOUT_FIELDS = (
        "init_sparsity",
        "final_sparsity",
        "inter_func",
        "leave_enabled",
        "global_sparsity",
        "mask_type",
        "n",
        "m",
    )
    END_RULE = None
    UPDATES_BETWEEN = False

    def targets_for_epoch(self, epoch: float) -> list[float]:
        return [1.0 - float((r.param != 0).float().mean()) for r in self.refs]

    def prune(self, module: Any, targets: list[float]) -> None:
        """The masks become the current non-zero pattern (never reopening a pruned entry)."""
        masks: list[Tensor] = [r.param.detach() != 0 for r in self.refs]
        self.enforcer.set_masks(masks)
