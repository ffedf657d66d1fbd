"""The modifier lifecycle (`base`) and the non-pruning modifiers (learning rate, weight decay,
epoch range, quantization). Each module registers its own tags (``@register_modifier``) when it
is imported; the pruners live in `sparseml.pruning` (`sparseml.pruning.methods`). A modifier of
one's own registers the same way: define it in any module and import that module.
"""

from sparseml.modifiers import learning_rate, quantization, training  # noqa: F401  (registrations)
from sparseml.modifiers.base import Modifier
from sparseml.modifiers.learning_rate import LearningRateFunctionModifier, LearningRateModifier
from sparseml.modifiers.quantization import QuantizationModifier
from sparseml.modifiers.training import (
    EpochRangeModifier,
    SetLearningRateModifier,
    SetWeightDecayModifier,
)

__all__ = [
    "EpochRangeModifier",
    "LearningRateFunctionModifier",
    "LearningRateModifier",
    "Modifier",
    "QuantizationModifier",
    "SetLearningRateModifier",
    "SetWeightDecayModifier",
]
