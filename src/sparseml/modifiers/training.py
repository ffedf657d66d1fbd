"""Training-schedule modifiers: epoch range, learning rate functions, LR and weight decay sets.

These write ``lr`` / ``weight_decay`` directly into the real optimizer's param groups inside
the manager's step wrapper, immediately before each optimizer step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparseml.fields import Field, FieldValueError, as_bool, as_float
from sparseml.modifiers.base import Modifier
from sparseml.registry import register_modifier
from sparseml.schedules import lr_function_value

LR_FUNCS = ("linear", "cosine", "exponential", "step", "cyclic_linear")


def _param_groups(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    raise FieldValueError("must be a list of param group indices or null")


def _lr_func(value: Any) -> str:
    if value not in LR_FUNCS:
        raise FieldValueError(f"must be one of {', '.join(LR_FUNCS)}")
    return value


def _groups(optimizer: Any, indices: list[int] | None) -> list[dict]:
    groups = optimizer.param_groups
    if indices is None:
        return list(groups)
    bad = [i for i in indices if not 0 <= i < len(groups)]
    if bad:
        raise IndexError(f"param_groups {bad} out of range: the optimizer has {len(groups)} groups")
    return [groups[i] for i in indices]


@register_modifier
class EpochRangeModifier(Modifier):
    """Sets the training length: the manager's ``max_epochs`` covers ``end_epoch``."""

    FIELDS = {
        "start_epoch": Field(convert=as_float(-1.0), doc="first epoch"),
        "end_epoch": Field(convert=as_float(-1.0), doc="number of epochs"),
    }
    SPARSIFICATION_TYPES = ("general", "epoch")


@register_modifier
class LearningRateFunctionModifier(Modifier):
    """Cyclic LR schedule (CAP semantics) between ``start_epoch`` and ``end_epoch``.

    Per cycle of ``cycle_epochs``: ``linear`` ramps ``init_lr`` -> ``final_lr``, ``cosine``
    anneals, ``exponential``/``step`` decay by ``decay_rate`` every ``decay_epochs``; cycle ``i``
    is scaled by ``cycle_mul ** i``. ``cyclic_linear`` is an alias of ``linear``. The LR is
    written at every step while active; the update at ``end_epoch`` writes the value of the
    range's last step, which the LR keeps afterwards. Formulas:
    ``sparseml.schedules.lr_function_value``.

    Sample::

        - !LearningRateFunctionModifier
          start_epoch: 0
          end_epoch: 20
          lr_func: linear
          init_lr: 1.0e-4
          final_lr: 1.0e-5
          cycle_epochs: 20
    """

    FIELDS = {
        "lr_func": Field(convert=_lr_func, doc="linear, cosine, exponential, step"),
        "init_lr": Field(convert=as_float(0.0, 1.0), doc="LR at the start of a cycle"),
        "final_lr": Field(0.0, as_float(0.0, 1.0), "LR at the end of a cycle"),
        "start_epoch": Field(convert=as_float(-1.0), doc="first epoch of the schedule"),
        "end_epoch": Field(convert=as_float(-1.0), doc="last epoch of the schedule"),
        "cycle_epochs": Field(-1.0, as_float(), "cycle length (-1: the whole range)"),
        "cycle_mul": Field(1.0, as_float(0.0, lo_open=True), "LR factor per completed cycle"),
        "warmup": Field(0.0, as_float(0.0), "warmup epochs at the start of each cycle"),
        "decay_rate": Field(0.9, as_float(0.0, lo_open=True), "decay for exponential/step"),
        "decay_epochs": Field(1.0, as_float(0.0, lo_open=True), "decay period (epochs)"),
        "param_groups": Field(None, _param_groups, "indices of param groups (null: all)"),
        "update_frequency": Field(-1.0, lambda v: -1.0, "ignored: the LR is set every step"),
    }
    SPARSIFICATION_TYPES = ("learning_rate",)
    END_RULE = "gt"
    UPDATES_BETWEEN = True

    def validate(self) -> None:
        super().validate()
        if self._values["cycle_epochs"] == 0:
            raise self.field_error("cycle_epochs", "must be > 0 or -1 (the whole range)")

    @property
    def effective_cycle_epochs(self) -> float:
        cycle = self.cycle_epochs
        return self.end_epoch - self.start_epoch if cycle < 0 else cycle

    def lr_at(self, epoch: float, steps_per_epoch: int) -> float:
        func = "linear" if self.lr_func == "cyclic_linear" else self.lr_func
        epoch = min(epoch, self.end_epoch - 1.0 / steps_per_epoch)
        return lr_function_value(
            func,
            epoch,
            steps_per_epoch,
            start_epoch=self.start_epoch,
            end_epoch=self.end_epoch,
            init_lr=self.init_lr,
            final_lr=self.final_lr,
            cycle_epochs=self.effective_cycle_epochs,
            cycle_mul=self.cycle_mul,
            warmup=self.warmup,
            decay_rate=self.decay_rate,
            decay_epochs=self.decay_epochs,
        )

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        if optimizer is None:
            return
        lr = self.lr_at(epoch, steps_per_epoch)
        for group in _groups(optimizer, self.param_groups):
            group["lr"] = lr


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
            for group in _groups(optimizer, self.param_groups):
                group[self.KEY] = getattr(self, self.KEY)


@register_modifier
class SetLearningRateModifier(_SetOnceModifier):
    """Sets ``learning_rate`` on the param groups at ``start_epoch``."""

    KEY = "lr"
    FIELDS = {
        "learning_rate": Field(convert=as_float(0.0, 1.0, lo_open=True), doc="LR in (0, 1]"),
        "param_groups": Field(None, _param_groups, "indices of param groups (null: all)"),
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
        "param_groups": Field(None, _param_groups, "indices of param groups (null: all)"),
        "constant_logging": Field(False, as_bool, "accepted for compatibility"),
    }
    SPARSIFICATION_TYPES = ("regularization",)
