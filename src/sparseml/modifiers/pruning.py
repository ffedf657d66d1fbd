"""Shared base of every pruning modifier: parameter selection, sparsity schedule, masks.

A subclass decides how to score and (optionally) update weights by overriding ``prune``; the
base turns the schedule into per-parameter targets, keeps the masks and enforces them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparseml.errors import RecipeError
from sparseml.fields import (
    REQUIRED,
    Field,
    FieldValueError,
    as_bool,
    as_float,
    as_int,
    as_str_list,
    one_of,
    optional,
)
from sparseml.masks import MaskEnforcer, MaskSpec, check_groupable, create_masks, parse_mask_type
from sparseml.modifiers.base import Modifier
from sparseml.params import ParamRef, assign_targets, select_params
from sparseml.schedules import INTER_FUNCS, interpolate

FROM_PARAM = "__FROM_PARAM__"
_sparsity = as_float(0.0, 1.0, hi_open=True)


def _init_sparsity(value: Any) -> float | str:
    if isinstance(value, str) and value.upper() == FROM_PARAM:
        return FROM_PARAM
    return _sparsity(value)


def _final_sparsity(value: Any) -> float | dict[float, list[str]]:
    if isinstance(value, dict):
        out = {}
        for key, names in value.items():
            out[_sparsity(key)] = as_str_list(names)
        if not out:
            raise FieldValueError("must not be an empty mapping")
        return out
    return _sparsity(value)


def _frequency(value: Any) -> float:
    x = as_float(allow_inf=False)(value)
    if x != -1 and x <= 0:
        raise FieldValueError("must be > 0 (epochs between updates) or -1 (every step)")
    return x


def _mask_type(value: Any) -> str:
    if isinstance(value, (list, tuple)) or not isinstance(value, str):
        raise FieldValueError("must be unstructured, block4, 'N:M' digits such as \"2:4\", or N:M")
    return value.strip()


PRUNING_FIELDS = {
    "params": Field(["__ALL_PRUNABLE__"], as_str_list, "names or re:<regex>; __ALL_PRUNABLE__"),
    "init_sparsity": Field(0.0, _init_sparsity, "sparsity at start_epoch, in [0, 1)"),
    "final_sparsity": Field(
        REQUIRED, _final_sparsity, "sparsity at end_epoch, or {sparsity: params}"
    ),
    "update_frequency": Field(-1.0, _frequency, "epochs between pruning steps (-1: every step)"),
    "inter_func": Field("cubic", one_of(*INTER_FUNCS), "shape of the sparsity schedule"),
    "leave_enabled": Field(True, as_bool, "keep masks enforced after end_epoch"),
    "global_sparsity": Field(False, as_bool, "one threshold over all params"),
    "mask_type": Field("unstructured", _mask_type, 'unstructured, block4, "N:M"'),
    "n": Field(None, optional(as_int(1)), "N of an N:M mask (with mask_type: N:M)"),
    "m": Field(None, optional(as_int(2)), "M of an N:M mask (with mask_type: N:M)"),
}


class PruningModifier(Modifier):
    """Base of the pruning modifiers (not usable in a recipe by itself)."""

    FIELDS = PRUNING_FIELDS
    SPARSIFICATION_TYPES = ("pruning",)
    END_RULE = "ge"
    UPDATES_BETWEEN = True
    # Second-order pruners wait for the first optimizer step during training (they need the
    # training loop's gradients machinery); with apply() (epoch = inf) they prune at initialize.
    PRUNES_AT_INITIALIZE: ClassVar[bool] = True

    def reset_state(self) -> None:
        super().reset_state()
        self.refs: list[ParamRef] = []
        self.enforcer: MaskEnforcer | None = None
        self.init_targets: list[float] = []
        self.final_targets: list[float] = []
        self.applied_sparsity: list[float] | None = None

    # ----- validation ---------------------------------------------------------------------------
    @property
    def mask_spec(self) -> MaskSpec:
        return parse_mask_type(self.mask_type, self.n, self.m)

    def validate(self) -> None:
        super().validate()
        try:
            spec = self.mask_spec
        except RecipeError as err:
            raise self.field_error("mask_type", str(err)) from None
        init, final = self._values["init_sparsity"], self._values["final_sparsity"]
        if isinstance(final, dict) and [
            p for p in self._values["params"] if p != "__ALL_PRUNABLE__"
        ]:
            raise self.field_error("params", "must be empty when final_sparsity is a mapping")
        # None: the subclass sets its own target (e.g. a FLOPs target) and checks it itself
        finals = [] if final is None else list(final) if isinstance(final, dict) else [final]
        if isinstance(init, float) and any(init > f + 1e-12 for f in finals):
            raise self.field_error("init_sparsity", f"must be <= final_sparsity ({final})")
        if spec.kind != "nm" and (self._values["n"] is not None or self._values["m"] is not None):
            raise self.field_error("n", "n and m are only allowed with an N:M mask_type")
        if spec.kind == "nm":
            target = spec.sparsity
            values = finals + ([init] if isinstance(init, float) else [])
            if any(abs(v - target) > 1e-6 for v in values):
                raise self.field_error(
                    "final_sparsity",
                    f"must equal N/M = {target} for mask_type {spec} (init_sparsity too)",
                )

    # ----- schedule -----------------------------------------------------------------------------
    def targets_for_epoch(self, epoch: float) -> list[float]:
        return [
            interpolate(epoch, self.start_epoch, self.end_epoch, s0, s1, self.inter_func)
            for s0, s1 in zip(self.init_targets, self.final_targets)
        ]

    # ----- lifecycle ----------------------------------------------------------------------------
    def initialize(
        self, module: nn.Module, epoch: float = 0.0, loggers: Any = None, **kwargs: Any
    ) -> None:
        self.validate()
        owner = type(self).__name__
        final = self.final_sparsity
        if isinstance(final, dict):
            self.refs, self.final_targets = assign_targets(
                final, lambda patterns: select_params(module, patterns, owner), owner
            )
        else:
            self.refs = select_params(module, self.params, owner)
            self.final_targets = [final] * len(self.refs)
        spec = self.mask_spec
        for ref in self.refs:
            try:
                check_groupable(ref.name, ref.param.shape, spec)
            except RecipeError as err:
                raise self.field_error("mask_type", str(err)) from None
        if self.init_sparsity == FROM_PARAM:
            self.init_targets = [float((r.param == 0).float().mean()) for r in self.refs]
        else:
            self.init_targets = [self.init_sparsity] * len(self.refs)
        masks = [torch.ones_like(r.param, dtype=torch.bool) for r in self.refs]
        self.enforcer = MaskEnforcer(self.refs, masks)
        self.on_initialize(module, **kwargs)
        super().initialize(module, epoch, loggers, **kwargs)
        prune_now = self.PRUNES_AT_INITIALIZE or math.isinf(epoch)
        if prune_now and not self.resuming and self.start_pending(epoch):
            self.scheduled_update(module, None, epoch, 1)

    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        """Hook for subclasses (e.g. to build a grad sampler from ``kwargs``)."""

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        assert self.enforcer is not None
        self.enforcer.enable()
        targets = self.targets_for_epoch(epoch)
        self.prune(module, targets)
        self.applied_sparsity = targets
        self.enforcer.apply()

    def on_end(self, module: nn.Module) -> None:
        if not self.leave_enabled and self.enforcer is not None:
            self.enforcer.disable()

    def optimizer_post_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        if self.enforcer is not None and self.enforcer.enabled:
            self.enforcer.apply()

    def finalize(self, module: nn.Module | None = None, **kwargs: Any) -> None:
        if self.enforcer is not None:
            if self.enforcer.enabled:
                self.enforcer.apply()
            self.enforcer.disable()
        super().finalize(module, **kwargs)

    # ----- pruning ------------------------------------------------------------------------------
    @property
    def masks(self) -> list[Tensor]:
        return [] if self.enforcer is None else self.enforcer.masks

    def set_masks(self, masks: list[Tensor]) -> None:
        """Install new keep-masks; entries already pruned stay pruned."""
        assert self.enforcer is not None
        old = self.enforcer.masks
        self.enforcer.set_masks([m.to(o.device) & o for m, o in zip(masks, old)])

    def masked_scores(self, scores: list[Tensor]) -> list[Tensor]:
        """Scores with ``-inf`` on already pruned entries (so they are selected first)."""
        return [s.masked_fill(~m.to(s.device), -math.inf) for s, m in zip(scores, self.masks)]

    def current_sparsities(self) -> list[float]:
        return [1.0 - float(m.float().mean()) for m in self.masks]

    def score_parameters(self) -> list[Tensor]:
        """Scores (higher = keep) for each selected parameter; magnitude by default."""
        return [r.param.detach().abs() for r in self.refs]

    def prune(self, module: nn.Module, targets: list[float]) -> None:
        """Compute and install masks for ``targets`` (one sparsity per parameter)."""
        scores = self.masked_scores(self.score_parameters())
        self.set_masks(create_masks(scores, targets, self.mask_spec, self.global_sparsity))

    # ----- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["applied_sparsity"] = self.applied_sparsity
        state["masks"] = {r.name: m.detach().cpu().clone() for r, m in zip(self.refs, self.masks)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enforcer is None:
            raise RuntimeError(f"{type(self).__name__}: initialize before load_state_dict")
        masks = state.get("masks", {})
        names = [r.name for r in self.refs]
        if sorted(masks) != sorted(names):
            raise RecipeError(
                f"{type(self).__name__}: saved masks are for {sorted(masks)}, "
                f"but the recipe selects {sorted(names)}"
            )
        super().load_state_dict(state)
        self.applied_sparsity = state.get("applied_sparsity")
        self.enforcer.set_masks([masks[n].to(torch.bool) for n in names])
        if self.started and (self.leave_enabled or not self.ended):
            self.enforcer.enable()
        else:
            self.enforcer.disable()


# ----- schedule questions over a manager's pruning modifiers --------------------------------------
# Duck-typed: ConstantPruningModifier is a pruning modifier without deriving from PruningModifier
# (its ``applied_sparsity`` is None and it has no update_frequency).
def active_pruning_modifier(modifiers: list[Modifier], epoch: float) -> Modifier | None:
    """The first modifier (manager order) with ``start_epoch <= epoch < end_epoch``."""
    for modifier in modifiers:
        end = modifier.end_epoch if modifier.end_epoch >= 0 else math.inf
        if modifier.start_epoch <= epoch < end:
            return modifier
    return None


def last_enforced_pruning_modifier(modifiers: list[Modifier], epoch: float) -> Modifier | None:
    """The modifier that ended last before ``epoch`` and still enforces its masks."""
    done = [
        m
        for m in modifiers
        if 0 <= m.end_epoch <= epoch
        and getattr(m, "leave_enabled", False)
        and getattr(m, "applied_sparsity", None) is not None
    ]
    return max(done, key=lambda m: m.end_epoch, default=None)


def is_update_epoch(modifiers: list[Modifier], epoch: float) -> bool:
    """True where a modifier changes the sparsity: its start, every ``update_frequency``
    epochs after it, and its end."""
    for modifier in modifiers:
        start, end = modifier.start_epoch, modifier.end_epoch
        freq = getattr(modifier, "update_frequency", 0) or 0
        if freq <= 0 or epoch < start or (0 <= end < epoch):
            continue
        if (epoch - start) % freq == 0 or epoch == end:
            return True
    return False


def sparsity_status(modifiers: list[Modifier], epoch: float) -> dict[str, Any]:
    """The schedule at ``epoch``: ``sparsity`` (mean ``applied_sparsity`` of the active
    modifier, else of the last one whose masks are still enforced, else 0.0), ``update_epoch``
    (:func:`is_update_epoch`) and ``modifier`` (the class name of the one reported, or None)."""
    modifier = active_pruning_modifier(modifiers, epoch) or last_enforced_pruning_modifier(
        modifiers, epoch
    )
    value = getattr(modifier, "applied_sparsity", None)
    if value is None:
        sparsity = 0.0
    elif isinstance(value, list | tuple):
        sparsity = float(sum(value) / len(value)) if value else 0.0
    else:
        sparsity = float(value)
    return {
        "sparsity": sparsity,
        "update_epoch": is_update_epoch(modifiers, epoch),
        "modifier": None if modifier is None else type(modifier).__name__,
    }


def masks_by_name(modifiers: list[Modifier]) -> dict[str, Tensor]:
    """Parameter name -> boolean keep-mask; a parameter under several modifiers gets the AND."""
    masks: dict[str, Tensor] = {}
    for modifier in modifiers:
        for ref, mask in zip(getattr(modifier, "refs", []), getattr(modifier, "masks", [])):
            mask = mask.detach().to(torch.bool)
            if ref.name in masks:
                masks[ref.name] = masks[ref.name] & mask.to(masks[ref.name].device)
            else:
                masks[ref.name] = mask.clone()
    return masks
