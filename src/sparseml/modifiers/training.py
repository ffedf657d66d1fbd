"""Training-schedule modifiers that set values: the epoch range, and learning rate and
weight decay set once; the selection of optimizer param groups the schedule modifiers share
(`sparseml.modifiers.learning_rate` holds the LR functions and torch schedulers).

These write ``lr`` / ``weight_decay`` directly into the real optimizer's param groups inside
the manager's step wrapper, immediately before each optimizer step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparseml.fields import Field, FieldValueError, as_bool, as_float
from sparseml.modifiers.base import Modifier
from sparseml.registry import register_modifier


def as_param_groups(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    raise FieldValueError("must be a list of param group indices or null")


def selected_groups(optimizer: Any, indices: list[int] | None) -> list[dict]:
    groups = optimizer.param_groups
    if indices is None:
        return list(groups)
    bad = [i for i in indices if not 0 <= i < len(groups)]
    if bad:
        raise IndexError(f"param_groups {bad} out of range: the optimizer has {len(groups)} groups")
    return [groups[i] for i in indices]


def check_param_groups(modifiers: list, optimizer: Any) -> None:
    """Every ``param_groups`` index of ``modifiers`` names a group of ``optimizer`` (checked
    before training, not at the modifier's first step)."""
    count = len(getattr(optimizer, "param_groups", ()))
    for mod in modifiers:
        bad = [i for i in getattr(mod, "param_groups", None) or () if not 0 <= i < count]
        if bad:
            raise mod.field_error(
                "param_groups",
                f"names groups {bad}: the optimizer has {count} param groups "
                f"(indices 0..{count - 1}, or null for all)",
            )


@register_modifier
class EpochRangeModifier(Modifier):
    """Sets the training length: the manager's ``max_epochs`` covers ``end_epoch``."""

    FIELDS = {
        "start_epoch": Field(convert=as_float(-1.0), doc="first epoch"),
        "end_epoch": Field(convert=as_float(-1.0), doc="number of epochs"),
    }
    SPARSIFICATION_TYPES = ("general", "epoch")


class _SetOnceModifier(Modifier):
    """Sets one param-group value once, when it starts (``end_epoch`` is always -1)."""

    KEY = ""

    def validate(self) -> None:
        super().validate()
        if self._values["end_epoch"] != -1:
            raise self.field_error("end_epoch", "must be -1: this modifier only sets a value once")

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        if optimizer is not None:
            for group in selected_groups(optimizer, self.param_groups):
                group[self.KEY] = getattr(self, self.KEY)


@register_modifier
class SetLearningRateModifier(_SetOnceModifier):
    """Sets ``learning_rate`` on the param groups at ``start_epoch``."""

    KEY = "lr"
    FIELDS = {
        "learning_rate": Field(convert=as_float(0.0, 1.0, lo_open=True), doc="LR in (0, 1]"),
        "param_groups": Field(None, as_param_groups, "indices of param groups (null: all)"),
        "constant_logging": Field(False, as_bool, "accepted for compatibility"),
    }
    SPARSIFICATION_TYPES = ("learning_rate",)

    @property
    def lr(self) -> float:
        return self.learning_rate


@register_modifier
class SetWeightDecayModifier(_SetOnceModifier):
    """Sets ``weight_decay`` on the param groups at ``start_epoch``."""

    KEY = "weight_decay"
    FIELDS = {
        "weight_decay": Field(convert=as_float(0.0), doc="weight decay >= 0"),
        "param_groups": Field(None, as_param_groups, "indices of param groups (null: all)"),
        "constant_logging": Field(False, as_bool, "accepted for compatibility"),
    }
    SPARSIFICATION_TYPES = ("regularization",)
