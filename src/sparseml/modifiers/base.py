"""The modifier lifecycle and scheduling shared by every recipe modifier.

Vocabulary (the same for every modifier): ``initialize`` (bind to a model), ``update`` (fired by
the manager at scheduled optimizer steps), ``optimizer_pre_step`` / ``optimizer_post_step``
(around every real optimizer step), ``finalize`` (remove hooks), ``state_dict`` /
``load_state_dict`` (exact resume).

Schedule: a modifier starts at the first step whose fractional epoch is ``>= start_epoch``
(``-1`` = the first step) and ends at the first step ``>= end_epoch`` (``-1`` = never).
"Update" modifiers (pruning, LR functions) also fire in between, every ``update_frequency``
epochs after their last update (``-1`` = every step).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import yaml
from torch import nn

from sparseml.fields import Check, Field, FieldModel, as_float

_TOL = 1e-9


def epoch_field(default: float = -1.0, doc: str = "") -> Field:
    return Field(default, as_float(-1.0), doc)


def _ends_early(mod: Modifier, rule: str) -> bool:
    start, end = mod._values["start_epoch"], mod._values["end_epoch"]
    if rule != mod.END_RULE or start < 0 or end < 0:
        return False
    return end < start if rule == "ge" else end <= start


def _end_message(mod: Modifier, relation: str) -> str:
    return f"must be {relation} start_epoch ({mod._values['start_epoch']})"


class Modifier(FieldModel):
    """Base of every recipe modifier: fields ``start_epoch`` and ``end_epoch``."""

    FIELDS = {
        "start_epoch": epoch_field(doc="epoch at which the modifier starts (-1: first step)"),
        "end_epoch": epoch_field(doc="epoch at which the modifier ends (-1: never)"),
    }
    SPARSIFICATION_TYPES: ClassVar[tuple[str, ...]] = ()
    # Relation required between end and start: None = no check, "ge" = end >= start, "gt" = end > start.
    END_RULE: ClassVar[str | None] = None
    UPDATES_BETWEEN: ClassVar[bool] = False  # fires every update_frequency epochs while active

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reset_state()

    def reset_state(self) -> None:
        self.initialized = False
        self.enabled = True
        self.started = False
        self.ended = False
        self.last_update: float | None = None
        # True while the manager initializes this modifier to restore a saved state: no
        # pruning at initialize, the saved masks are installed right after.
        self.resuming = False

    CHECKS = (
        Check("end_epoch", lambda m: _ends_early(m, "ge"), lambda m: _end_message(m, ">=")),
        Check("end_epoch", lambda m: _ends_early(m, "gt"), lambda m: _end_message(m, ">")),
    )

    # ----- identity ---------------------------------------------------------------------------
    @property
    def sparsification_types(self) -> tuple[str, ...]:
        return self.SPARSIFICATION_TYPES

    @property
    def identifier(self) -> str:
        props = sorted(f"{k}:{v}" for k, v in self.field_values().items())
        digest = hashlib.md5(str(props).encode()).hexdigest()[:12]
        return f"{type(self).__name__}-{digest}"

    def __str__(self) -> str:
        lines = [f"!{type(self).__name__}"]
        for name in sorted(self.fields):
            text = yaml.safe_dump(self._values[name], default_flow_style=True, width=10**6)
            text = text.strip().removesuffix("...").strip()
            lines.append(f"    {name}: {text}")
        return "\n".join(lines)

    __repr__ = __str__

    # ----- schedule predicates ---------------------------------------------------------------
    def start_pending(self, epoch: float) -> bool:
        start = self.start_epoch
        return not self.started and not self.ended and (start == -1 or epoch >= start - _TOL)

    def end_pending(self, epoch: float) -> bool:
        end = self.end_epoch
        return self.started and not self.ended and end >= 0 and epoch >= end - _TOL

    def update_ready(self, epoch: float, steps_per_epoch: int) -> bool:
        if not self.enabled:
            return False
        if self.start_pending(epoch) or self.end_pending(epoch):
            return True
        if not self.UPDATES_BETWEEN or not self.started or self.ended:
            return False
        if epoch <= self.start_epoch + _TOL:
            return False
        freq = self._values.get("update_frequency", -1.0)
        if freq is None or freq <= 0 or self.last_update is None:
            return True
        return epoch >= self.last_update + freq - _TOL

    # ----- lifecycle -------------------------------------------------------------------------
    def initialize(
        self, module: nn.Module, epoch: float = 0.0, loggers: Any = None, **kwargs: Any
    ) -> None:
        self.validate()
        self.initialized = True

    def scheduled_update(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        starting = self.start_pending(epoch)
        self.update(module, optimizer, epoch, steps_per_epoch)
        if starting:
            self.started = True
        if self.end_pending(epoch):
            self.ended = True
            self.on_end(module)

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        self.last_update = epoch

    def on_end(self, module: nn.Module) -> None:
        """Called once when the modifier's end is reached."""

    def optimizer_pre_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        pass

    def optimizer_post_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        pass

    def loss_update(
        self, loss: Any, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> Any:
        return loss

    def finalize(self, module: nn.Module | None = None, **kwargs: Any) -> None:
        self.enabled = False

    def rank_state_dict(self) -> dict[str, Any]:
        """State that differs between ranks (saved per rank by the training script)."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's part saved by ``rank_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        last = self.last_update
        return {
            "started": self.started,
            "ended": self.ended,
            "last_update": None if last is None else float(last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started = bool(state.get("started", False))
        self.ended = bool(state.get("ended", False))
        self.last_update = state.get("last_update")

    # ----- ordering ---------------------------------------------------------------------------
    def sort_key(self) -> tuple:
        end = self.end_epoch
        end_key = math.inf if end == -1 else end
        return (end_key, self.start_epoch, self.identifier)
