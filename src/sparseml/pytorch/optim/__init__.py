"""``from sparseml.pytorch.optim import ScheduledModifierManager`` (registers every modifier)."""

import sparseml.modifiers  # noqa: F401  (registers the recipe tags)
import sparseml.pruning.methods  # noqa: F401
from sparseml.manager import RecipeManagerStepWrapper, ScheduledModifierManager

__all__ = ["RecipeManagerStepWrapper", "ScheduledModifierManager"]
