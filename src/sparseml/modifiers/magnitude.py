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

import torch
from torch import nn

from sparseml.fields import Field, as_bool, as_str_list, one_of
from sparseml.modifiers.base import Modifier, epoch_field
from sparseml.modifiers.pruning import PruningModifier
from sparseml.registry import register_modifier


@register_modifier
class GMPruningModifier(PruningModifier):
    """Gradual magnitude pruning; per layer unless ``global_sparsity: true``."""

    FIELDS = {
        "phased": Field(False, as_bool, "unsupported; must be false"),
        "score_type": Field("magnitude", one_of("magnitude"), "only magnitude is supported"),
    }

    def validate(self) -> None:
        super().validate()
        if self._values["phased"]:
            raise self.field_error("phased", "is not supported; use false")


@register_modifier
class MagnitudePruningModifier(PruningModifier):
    """Gradual magnitude pruning with one threshold per parameter tensor."""

    def validate(self) -> None:
        super().validate()
        if self._values["global_sparsity"]:
            raise self.field_error(
                "global_sparsity", "must be false; use GlobalMagnitudePruningModifier"
            )


@register_modifier
class GlobalMagnitudePruningModifier(PruningModifier):
    """Gradual magnitude pruning with one threshold over all selected parameters."""

    FIELDS = {"global_sparsity": Field(True, as_bool, "always true for this modifier")}

    def validate(self) -> None:
        super().validate()
        if not self._values["global_sparsity"]:
            raise self.field_error("global_sparsity", "must be true; use MagnitudePruningModifier")


@register_modifier
class ConstantPruningModifier(Modifier):
    """Freezes the current zero pattern of ``params`` between ``start_epoch`` and ``end_epoch``.

    The mask is ``param != 0`` taken when the modifier starts and enforced like any pruning
    mask (forward pre-hooks, gradient hooks, re-application after each step); at ``end_epoch``
    the hooks are removed. Taking the pattern once (instead of at every step) costs nothing per
    step and cannot freeze a weight that crosses zero by chance.
    """

    FIELDS = {
        "params": Field(["__ALL_PRUNABLE__"], as_str_list, "names or re:<regex>"),
        "update_frequency": Field(-1.0, lambda v: -1.0, "ignored: masks follow every step"),
        "start_epoch": epoch_field(),
        "end_epoch": epoch_field(),
    }
    SPARSIFICATION_TYPES = ("pruning",)

    def reset_state(self) -> None:
        super().reset_state()
        self._pruner: _FrozenMask | None = None

    @property
    def applied_sparsity(self) -> None:
        return None

    @property
    def masks(self) -> list[torch.Tensor]:
        return [] if self._pruner is None else self._pruner.masks

    @property
    def refs(self) -> list:
        return [] if self._pruner is None else self._pruner.refs

    def initialize(
        self, module: nn.Module, epoch: float = 0.0, loggers: Any = None, **kwargs: Any
    ) -> None:
        self._pruner = _FrozenMask(module, self.params, type(self).__name__)
        super().initialize(module, epoch, loggers, **kwargs)
        if not self.resuming and self.start_pending(epoch):
            self.scheduled_update(module, None, epoch, 1)

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        assert self._pruner is not None
        self._pruner.refresh()

    def on_end(self, module: nn.Module) -> None:
        if self._pruner is not None:
            self._pruner.enforcer.disable()

    def optimizer_post_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        if self._pruner is not None and self._pruner.enforcer.enabled:
            self._pruner.enforcer.apply()

    def finalize(self, module: nn.Module | None = None, **kwargs: Any) -> None:
        if self._pruner is not None:
            self._pruner.enforcer.disable()
        super().finalize(module, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["masks"] = {r.name: m.cpu().clone() for r, m in zip(self.refs, self.masks)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._pruner is not None and self.started and not self.ended:
            masks = state.get("masks", {})
            self._pruner.enforcer.set_masks([masks[r.name] for r in self.refs])
            self._pruner.enforcer.enable()


class _FrozenMask:
    """Masks equal to the current non-zero pattern of the selected parameters."""

    def __init__(self, module: nn.Module, patterns: list[str], owner: str) -> None:
        from sparseml.masks import MaskEnforcer
        from sparseml.params import select_params

        self.refs = select_params(module, patterns, owner)
        self.enforcer = MaskEnforcer(self.refs, [r.param.detach() != 0 for r in self.refs])

    @property
    def masks(self) -> list[torch.Tensor]:
        return self.enforcer.masks

    def refresh(self) -> None:
        self.enforcer.set_masks([r.param.detach() != 0 for r in self.refs])
        self.enforcer.enable()
