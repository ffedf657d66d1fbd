"""``ScheduledModifierManager``: runs a recipe's modifiers over a model and its optimizer.

Training::

    manager = ScheduledModifierManager.from_yaml("recipe.yaml")
    optimizer = manager.modify(model, optimizer, steps_per_epoch=len(loader))
    ...  # optimizer.step() now fires the modifiers due at that step
    manager.finalize(model)

One-shot: ``manager.apply(model, grad_sampler={...})`` drives every modifier to the end of its
schedule (epoch = +inf) and finalizes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from sparseml.errors import RecipeError
from sparseml.modifiers.base import Modifier
from sparseml.modifiers.training import check_param_groups
from sparseml.params import unwrap
from sparseml.recipe import dump_modifiers, load_modifiers
from sparseml.serialization import atomic_write_text

_logger = logging.getLogger(__name__)


class ScheduledModifierManager:
    def __init__(self, modifiers: list[Modifier], metadata: dict | None = None) -> None:
        self._modifiers = sorted(modifiers, key=lambda m: m.sort_key())
        self.metadata = metadata
        self.initialized = False
        self.enabled = True
        self.epoch = 0.0
        self._pending_state: dict[str, Any] = {}

    @classmethod
    def from_yaml(
        cls,
        file_path: str | Path,
        add_modifiers: list[Modifier] | None = None,
        recipe_variables: Any = None,
        metadata: dict | None = None,
    ) -> ScheduledModifierManager:
        """Manager for a recipe path (.yaml, .yml, .md) or raw recipe text."""
        modifiers = load_modifiers(file_path, recipe_variables)
        return cls(modifiers + list(add_modifiers or []), metadata)

    # ----- views ----------------------------------------------------------------------------------
    @property
    def modifiers(self) -> list[Modifier]:
        return self._modifiers

    def _of_type(self, kind: str) -> list[Modifier]:
        return [m for m in self._modifiers if kind in m.sparsification_types]

    @property
    def pruning_modifiers(self) -> list[Modifier]:
        return self._of_type("pruning")

    def sparsity_status(self, epoch: float) -> dict[str, Any]:
        """The pruning schedule at ``epoch``: ``sparsity`` (the mean sparsity of the first
        active pruning modifier's last step, else of the one that ended last and still holds
        its masks, else 0.0), ``update_epoch`` (a pruning step falls on ``epoch``) and
        ``modifier`` (the class name of the one reported, or None)."""
        mods = self.pruning_modifiers
        active = next((m for m in mods if m.is_active(epoch)), None)
        if active is None:
            holding = [m for m in mods if m.holds_masks_after(epoch)]
            active = max(holding, key=lambda m: m.end_epoch, default=None)
        value = None if active is None else active.reported_sparsity()
        return {
            "sparsity": 0.0 if value is None else value,
            "update_epoch": any(m.changes_sparsity_at(epoch) for m in mods),
            "modifier": None if active is None else type(active).__name__,
        }

    def masks(self) -> dict[str, Tensor]:
        """Parameter name -> boolean keep-mask of every pruning modifier (empty before modify);
        a parameter under several modifiers gets the AND."""
        masks: dict[str, Tensor] = {}
        for mod in self.pruning_modifiers:
            for name, mask in mod.named_masks().items():
                masks[name] = (
                    mask.clone() if name not in masks else masks[name] & mask.to(masks[name].device)
                )
        return masks

    @property
    def learning_rate_modifiers(self) -> list[Modifier]:
        return self._of_type("learning_rate")

    @property
    def epoch_modifiers(self) -> list[Modifier]:
        return self._of_type("epoch")

    @property
    def quantization_modifiers(self) -> list[Modifier]:
        return self._of_type("quantization")

    def _epochs(self) -> list[float]:
        return [
            e
            for m in self._modifiers
            for e in (m.start_epoch, m.end_epoch)
            if e > -1 and not math.isinf(e)
        ]

    @property
    def max_epochs(self) -> int:
        epochs = self._epochs()
        return max(math.ceil(e) for e in epochs) if epochs else -1

    @property
    def min_epochs(self) -> int:
        epochs = self._epochs()
        return min(math.floor(e) for e in epochs) if epochs else -1

    def __str__(self) -> str:
        return dump_modifiers(self._modifiers, self.metadata)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, str(self))

    # ----- lifecycle ------------------------------------------------------------------------------
    def _active(self) -> list[Modifier]:
        return [m for m in self._modifiers if m.enabled]

    def initialize(
        self, module: nn.Module, epoch: float = 0.0, loggers: Any = None, **kwargs: Any
    ) -> None:
        self.initialized = True
        self.epoch = epoch
        for key, mod in zip(self._keys(), self._modifiers):
            if mod.enabled and not mod.initialized:
                state = self._pending_state.pop(key, None)
                mod.resuming = state is not None
                mod.initialize(module, epoch, loggers, **kwargs)
                if state is not None:
                    mod.load_state_dict(state)
                    mod.resuming = False

    def modify(
        self,
        module: nn.Module,
        optimizer: Any,
        steps_per_epoch: int,
        wrap_optim: Any = None,
        epoch: float | None = None,
        allow_parallel_module: bool = True,
        **kwargs: Any,
    ) -> RecipeManagerStepWrapper:
        """Initialize on ``module`` and return a wrapper of ``optimizer`` whose ``step()`` fires
        the modifiers due at that step. ``steps_per_epoch`` counts optimizer updates."""
        if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        if kwargs.get("sweep_cache") is not None:
            # every gradual step prunes a different model: reused Fisher blocks and orders
            # would be those of the first step
            raise ValueError(
                "sweep_cache is only valid for manager.apply(...) on fresh copies of one dense "
                "model (a one-shot sweep); remove it from manager.modify(...)"
            )
        if epoch is None:
            epoch = self.epoch
        if not allow_parallel_module:
            module = unwrap(module)
        check_param_groups(self._modifiers, optimizer)
        if not self.initialized:
            self.initialize(module, epoch, **kwargs)
        return RecipeManagerStepWrapper(
            wrap_optim or optimizer, optimizer, module, self, epoch, steps_per_epoch
        )

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        for mod in self._active():
            if mod.update_ready(epoch, steps_per_epoch):
                mod.scheduled_update(module, optimizer, epoch, steps_per_epoch)

    def optimizer_pre_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        for mod in self._active():
            mod.optimizer_pre_step(module, optimizer, epoch, steps_per_epoch)

    def optimizer_post_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        for mod in self._active():
            mod.optimizer_post_step(module, optimizer, epoch, steps_per_epoch)

    def loss_update(
        self, loss: Any, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> Any:
        for mod in self._active():
            loss = mod.loss_update(loss, module, optimizer, epoch, steps_per_epoch)
        return loss

    def finalize(
        self, module: nn.Module | None = None, reset_loggers: bool = True, **kwargs: Any
    ) -> None:
        """Apply masks one last time and remove every hook the modifiers added."""
        for mod in self._modifiers:
            if mod.initialized:
                mod.finalize(module, **kwargs)
        self.enabled = False

    def apply(
        self,
        module: nn.Module,
        epoch: float = math.inf,
        loggers: Any = None,
        finalize: bool = True,
        calib_loader: Any = None,
        **kwargs: Any,
    ) -> None:
        """One-shot: run every modifier to its end state (epoch = +inf), then finalize.

        ``calib_loader`` (batches: a tensor, ``(inputs, target)`` or the grad sampler's
        ``(args, kwargs, target)``) calibrates the activation ranges of quantization modifiers
        on the model as pruned by the others (eval mode, no gradients); their scales are then
        frozen. A recipe that quantizes layer inputs needs it.
        """
        self.initialize(module, epoch, loggers, **kwargs)
        for mod in self.quantization_modifiers:
            if mod.enabled and mod.initialized:
                mod.calibrate(module, calib_loader)
        if finalize:
            self.finalize(module)

    # ----- state ----------------------------------------------------------------------------------
    def _keys(self) -> list[str]:
        keys, seen = [], {}
        for mod in self._modifiers:
            key = mod.identifier
            seen[key] = seen.get(key, 0) + 1
            keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        """Masks and schedule position of every modifier (tensors and plain values only)."""
        return {key: mod.state_dict() for key, mod in zip(self._keys(), self._modifiers)}

    def rank_state_dict(self) -> dict[str, Any]:
        """Per-rank state (e.g. M-FAC's buffered gradients, sharded over ranks): a training
        script gathers it from every rank and gives each rank its own back on resume."""
        return {k: mod.rank_state_dict() for k, mod in zip(self._keys(), self._modifiers)}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's ``rank_state_dict`` (after ``load_state_dict`` and ``modify``)."""
        for key, mod in zip(self._keys(), self._modifiers):
            if state.get(key):
                mod.load_rank_state_dict(state[key])

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore masks and schedule position saved by ``state_dict``.

        Call it before ``modify`` when resuming: the modifiers then install the saved masks at
        initialize instead of pruning again. After ``modify`` it overwrites the current state.
        """
        keys = self._keys()
        missing = [k for k in keys if k not in state]
        unexpected = [k for k in state if k not in keys]
        if strict and (missing or unexpected):
            raise RecipeError(
                "saved manager state does not match this recipe "
                f"(missing: {missing}, unexpected: {unexpected}); resume with the same recipe"
            )
        if not self.initialized:
            self._pending_state = {k: v for k, v in state.items() if k in keys}
            return
        for key, mod in zip(keys, self._modifiers):
            if key in state:
                mod.load_state_dict(state[key])

    # ----- run length -----------------------------------------------------------------------------
    def check_run_length(
        self, num_epochs: int, steps_per_epoch: int | None = None, strict: bool = True
    ) -> list[str]:
        """Refuse pruning modifiers that a run of ``num_epochs`` epochs would cut short.

        The run's last step is at epoch ``num_epochs - 1 / steps_per_epoch``; a pruning modifier
        ending after it silently stays at the sparsity of its last update. Raises ``RecipeError``
        naming, per modifier, the target and the sparsity reached: called before training,
        refusing loses no work, whereas a warning would go unseen until a whole run had produced
        a model less sparse than its recipe says. ``strict=False`` logs a warning instead.
        Returns the lines (empty when every pruning modifier reaches its target).
        """
        problems = [
            problem
            for mod in self.pruning_modifiers
            if (problem := mod.run_length_problem(num_epochs, steps_per_epoch)) is not None
        ]
        if problems and strict:
            raise RecipeError("; ".join(problems))
        for line in problems:
            _logger.warning("%s", line)
        return problems


class RecipeManagerStepWrapper:
    """Wraps an optimizer so that ``step()`` runs the manager around the real step.

    Everything else is forwarded to the wrapped optimizer, so the wrapper can be handed to
    AMP grad scalers, timm's ``NativeScaler`` and checkpoint code.
    """

    def __init__(
        self,
        wrapped: Any,
        optimizer: Any,
        module: nn.Module,
        manager: ScheduledModifierManager,
        epoch: float,
        steps_per_epoch: int,
    ) -> None:
        self._wrapped_optimizer = wrapped
        self._wrapped_real = optimizer
        self._wrapped_module = module
        self._wrapped_manager = manager
        self._wrapped_steps_per_epoch = steps_per_epoch
        self._wrapped_steps = round(epoch * steps_per_epoch)
        self._wrapped_epoch = epoch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_wrapped_optimizer"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_wrapped"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._wrapped_optimizer, name, value)

    @property
    def wrapped_optimizer(self) -> Any:
        return self._wrapped_optimizer

    @property
    def wrapped_manager(self) -> ScheduledModifierManager:
        return self._wrapped_manager

    @property
    def wrapped_module(self) -> nn.Module:
        return self._wrapped_module

    @property
    def wrapped_epoch(self) -> float:
        return self._wrapped_epoch

    @property
    def wrapped_steps(self) -> int:
        return self._wrapped_steps

    @property
    def wrapped_steps_per_epoch(self) -> int:
        return self._wrapped_steps_per_epoch

    def _run(self, real_step: Any, *args: Any, **kwargs: Any) -> Any:
        manager, module = self._wrapped_manager, self._wrapped_module
        epoch, spe, opt = self._wrapped_epoch, self._wrapped_steps_per_epoch, self._wrapped_real
        if manager.enabled:
            manager.update(module, opt, epoch, spe)
            manager.optimizer_pre_step(module, opt, epoch, spe)
        result = real_step(*args, **kwargs) if real_step is not None else None
        if manager.enabled:
            manager.optimizer_post_step(module, opt, epoch, spe)
        self._wrapped_steps += 1
        self._wrapped_epoch = self._wrapped_steps / spe
        return result

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._wrapped_optimizer.step, *args, **kwargs)

    def emulated_step(self) -> None:
        """Advance the schedule without a real optimizer step (e.g. a skipped AMP step)."""
        self._run(None)

    def loss_update(self, loss: Any) -> Any:
        return self._wrapped_manager.loss_update(
            loss,
            self._wrapped_module,
            self._wrapped_real,
            self._wrapped_epoch,
            self._wrapped_steps_per_epoch,
        )
