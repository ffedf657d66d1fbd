"""Learning-rate schedule modifiers: SparseML's LR functions (linear, cosine, exponential,
step, cyclic) and torch LR schedulers, between ``start_epoch`` and ``end_epoch``.

They write ``lr`` directly into the real optimizer's param groups inside the manager's step
wrapper, immediately before each optimizer step (param-group selection:
`sparseml.modifiers.training`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from sparseml.fields import Field, FieldValueError, as_bool, as_dict, as_float, as_int
from sparseml.modifiers.base import Modifier
from sparseml.modifiers.training import as_param_groups, selected_groups
from sparseml.registry import register_modifier
from sparseml.schedules import lr_function_value

LR_FUNCS = ("linear", "cosine", "exponential", "step", "cyclic_linear")
# lr_class -> (required lr_kwargs, optional lr_kwargs); CosineAnnealingWarmRestarts also takes
# SparseML's own names for its two keys (cycle_epochs = T_0, lr_min = eta_min).
LR_CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "StepLR": (("step_size",), ("gamma",)),
    "MultiStepLR": (("milestones",), ("gamma",)),
    "ExponentialLR": (("gamma",), ()),
    "CosineAnnealingWarmRestarts": ((), ("T_0", "cycle_epochs", "T_mult", "eta_min", "lr_min")),
}


def _lr_func(value: Any) -> str:
    if value not in LR_FUNCS:
        raise FieldValueError(f"must be one of {', '.join(LR_FUNCS)}")
    return value


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
        "param_groups": Field(None, as_param_groups, "indices of param groups (null: all)"),
        "update_frequency": Field(-1.0, lambda v: -1.0, "ignored: the LR is set every step"),
    }
    SPARSIFICATION_TYPES = ("learning_rate",)
    END_RULE = "gt"
    UPDATES_BETWEEN = True

    def validate(self) -> None:
        super().validate()
        if self._values["cycle_epochs"] == 0:
            raise self.field_error("cycle_epochs", "must be > 0 or -1 (the whole range)")
        self._check_growth()

    def _check_growth(self) -> None:
        """A decay_rate or cycle_mul above 1 makes the LR grow: it must stay <= 1 (as init_lr)
        over the whole range (computed in logs: 1e300 ** epochs overflows)."""
        v = self._values
        span = v["end_epoch"] - max(v["start_epoch"], 0.0)
        if span <= 0:
            return
        cycle = span if v["cycle_epochs"] < 0 else v["cycle_epochs"]
        growth = {"cycle_mul": math.log(v["cycle_mul"]) * max(math.ceil(span / cycle) - 1, 0)}
        if v["lr_func"] in ("exponential", "step"):
            growth["decay_rate"] = math.log(v["decay_rate"]) * min(cycle, span) / v["decay_epochs"]
        peak = math.log(max(v["init_lr"], v["final_lr"], 1e-300)) + sum(
            max(g, 0.0) for g in growth.values()
        )
        if peak > 1e-12:
            name = max(growth, key=growth.get)
            raise self.field_error(
                name,
                f"makes the LR grow above 1 within the schedule (init_lr {v['init_lr']:g}); "
                "use a value <= 1 or a shorter range",
            )

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
        for group in selected_groups(optimizer, self.param_groups):
            group["lr"] = lr


def _lr_class(value: Any) -> str:
    if not isinstance(value, str) or value not in LR_CLASSES:
        raise FieldValueError(f"must be one of {', '.join(LR_CLASSES)}")
    return value


def _log_types(value: Any) -> Any:
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        return value
    raise FieldValueError("must be a string or a list of strings (accepted for compatibility)")


@register_modifier
class LearningRateModifier(Modifier):
    """A torch LR scheduler (SparseML's ``LearningRateModifier``) between ``start_epoch`` and
    ``end_epoch``: SparseML's classification recipes use it.

    At ``start_epoch`` the LR becomes ``init_lr``; after that it follows
    ``torch.optim.lr_scheduler.<lr_class>(**lr_kwargs)`` with its epoch quantities counted in
    epochs (fractions allowed), as SparseML does: ``StepLR`` decays by ``gamma`` every
    ``step_size`` epochs, ``MultiStepLR`` at each epoch of ``milestones`` (absolute epochs,
    between start and end), ``ExponentialLR`` by ``gamma`` once per epoch (SparseML runs it as a
    StepLR of one epoch), ``CosineAnnealingWarmRestarts`` anneals to ``eta_min`` (``lr_min``)
    over ``T_0`` (``cycle_epochs``) epochs, cycles growing by ``T_mult``. The step schedulers
    count optimizer steps (``round(epochs x steps_per_epoch)``), the cosine one fractional
    epochs. The LR is written at every optimizer step while the modifier is active; from
    ``end_epoch`` on it keeps its last value. ``update_frequency`` is ignored as in SparseML
    (the scheduler follows every step). A training script whose recipe has this modifier
    leaves its own LR scheduler off.

    Sample::

        - !LearningRateModifier
          start_epoch: 0
          end_epoch: -1
          lr_class: MultiStepLR
          lr_kwargs: {milestones: [43, 60], gamma: 0.1}
          init_lr: 0.1
    """

    FIELDS = {
        "lr_class": Field(convert=_lr_class, doc=", ".join(LR_CLASSES)),
        "lr_kwargs": Field(convert=as_dict, doc="keyword arguments of lr_class (epochs)"),
        "init_lr": Field(convert=as_float(0.0, 1.0, lo_open=True), doc="LR at start_epoch"),
        "start_epoch": Field(convert=as_float(-1.0), doc="first epoch (-1: the first step)"),
        "end_epoch": Field(-1.0, as_float(-1.0), "epoch the LR stops changing (-1: never)"),
        "update_frequency": Field(-1.0, lambda v: -1.0, "ignored: the LR follows every step"),
        "constant_logging": Field(False, as_bool, "accepted for compatibility"),
        "log_types": Field("__ALL__", _log_types, "accepted for compatibility"),
    }
    SPARSIFICATION_TYPES = ("learning_rate",)
    END_RULE = "gt"
    UPDATES_BETWEEN = True

    def reset_state(self) -> None:
        super().reset_state()
        self._scheduler: Any = None
        self._scheduler_key: tuple | None = None
        self._scheduler_steps = 0

    def validate(self) -> None:
        super().validate()
        lr_class, kwargs = self._values["lr_class"], self._values["lr_kwargs"]
        required, optional = LR_CLASSES[lr_class]
        allowed = ", ".join(required + optional)
        for key in kwargs:
            if key not in required + optional:
                raise self.field_error(
                    "lr_kwargs", f"{key!r} is not an argument of {lr_class} (allowed: {allowed})"
                )
        for key in required:
            if key not in kwargs:
                raise self.field_error(
                    "lr_kwargs", f"{lr_class} needs {key!r} (allowed: {allowed})"
                )
        if lr_class == "CosineAnnealingWarmRestarts":
            if ("T_0" in kwargs) == ("cycle_epochs" in kwargs):
                raise self.field_error(
                    "lr_kwargs", f"{lr_class} needs exactly one of 'T_0' or 'cycle_epochs' (epochs)"
                )
            if "eta_min" in kwargs and "lr_min" in kwargs:
                raise self.field_error("lr_kwargs", "give 'eta_min' or 'lr_min', not both")
        checks = {
            "step_size": (as_float(0.0, lo_open=True), "epochs"),
            "gamma": (as_float(0.0, lo_open=True), "decay factor"),
            "T_0": (as_float(0.0, lo_open=True), "epochs"),
            "cycle_epochs": (as_float(0.0, lo_open=True), "epochs"),
            "T_mult": (as_int(1), "cycle growth factor"),
            "eta_min": (as_float(0.0), "minimum LR"),
            "lr_min": (as_float(0.0), "minimum LR"),
        }
        # the checked numbers are what the scheduler gets (YAML reads `1e-1` as a string)
        normalized = dict(kwargs)
        for key, (convert, what) in checks.items():
            if key in kwargs:
                try:
                    normalized[key] = convert(kwargs[key])
                except FieldValueError as err:
                    raise self.field_error("lr_kwargs", f"{key} ({what}) {err}") from None
        if "milestones" in kwargs:
            normalized["milestones"] = self._check_milestones(kwargs["milestones"])
        self._values["lr_kwargs"] = normalized

    def _check_milestones(self, milestones: Any) -> list[float]:
        start, end = max(self._values["start_epoch"], 0.0), self._values["end_epoch"]
        ok = isinstance(milestones, list) and milestones
        try:
            values = [as_float()(m) for m in milestones] if ok else []
        except FieldValueError:
            values, ok = [], False
        if not ok or values != sorted(values) or len(set(values)) != len(values):
            raise self.field_error(
                "lr_kwargs", "milestones must be a non-empty increasing list of epochs"
            )
        if values[0] <= start or (end >= 0 and values[-1] >= end):
            within = f"> start_epoch ({start})" + (f" and < end_epoch ({end})" if end >= 0 else "")
            raise self.field_error("lr_kwargs", f"milestones {values} must all be {within}")
        return values

    # ----- the LR ----------------------------------------------------------------------------
    def _build(self, steps_per_epoch: int) -> Any:
        """A private optimizer whose LR the torch scheduler drives; the real optimizer's groups
        get its value. The real optimizer is never handed to the scheduler, so its
        ``initial_lr`` and step counters stay the training script's own."""
        kwargs = dict(self.lr_kwargs)
        start = max(self.start_epoch, 0.0)
        steps = steps_per_epoch
        lr_class = self.lr_class
        if lr_class == "ExponentialLR":  # SparseML: one decay per epoch
            lr_class, kwargs = "StepLR", {"step_size": 1.0, "gamma": kwargs["gamma"]}
        if lr_class == "StepLR":
            kwargs["step_size"] = max(1, round(float(kwargs["step_size"]) * steps))
        elif lr_class == "MultiStepLR":
            kwargs["milestones"] = [round((float(m) - start) * steps) for m in kwargs["milestones"]]
        else:
            kwargs = {
                "T_0": float(kwargs.get("T_0", kwargs.get("cycle_epochs"))),
                "T_mult": int(kwargs.get("T_mult", 1)),
                "eta_min": float(kwargs.get("eta_min", kwargs.get("lr_min", 0.0))),
            }
        holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.init_lr)
        if lr_class == "CosineAnnealingWarmRestarts":
            # torch wants an int T_0 at construction; stepped with explicit (fractional)
            # epochs, only T_i = T_0 * T_mult ** cycle is used, so a fractional T_0 is set after.
            t_0 = kwargs.pop("T_0")
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(holder, T_0=1, **kwargs)
            sched.T_0 = sched.T_i = t_0
            return sched
        return getattr(torch.optim.lr_scheduler, lr_class)(holder, **kwargs)

    def lr_at(self, epoch: float, steps_per_epoch: int) -> float:
        """The LR at ``epoch`` (fractional), from the torch scheduler."""
        key = (steps_per_epoch,)
        offset = max(epoch - max(self.start_epoch, 0.0), 0.0)
        target = round(offset * steps_per_epoch)
        if self._scheduler is None or key != self._scheduler_key or target < self._scheduler_steps:
            self._scheduler, self._scheduler_key = self._build(steps_per_epoch), key
            self._scheduler_steps = 0
        with warnings.catch_warnings():  # it drives a private optimizer that never steps
            warnings.simplefilter("ignore", UserWarning)
            if self.lr_class == "CosineAnnealingWarmRestarts":
                self._scheduler.step(offset)
            else:
                for _ in range(target - self._scheduler_steps):
                    self._scheduler.step()
                self._scheduler_steps = target
        return float(self._scheduler.optimizer.param_groups[0]["lr"])

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        if optimizer is None or self.end_pending(epoch):  # from end_epoch on: the last LR stays
            return
        lr = self.lr_at(epoch, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
