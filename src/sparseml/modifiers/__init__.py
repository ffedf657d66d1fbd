"""Recipe modifiers; importing this package registers every built-in modifier tag."""

from importlib import import_module

from sparseml.modifiers import quantization  # noqa: F401  (registers !QuantizationModifier)
from sparseml.modifiers.base import Modifier
from sparseml.modifiers.magnitude import (
    ConstantPruningModifier,
    GlobalMagnitudePruningModifier,
    GMPruningModifier,
    MagnitudePruningModifier,
)
from sparseml.modifiers.pruning import PruningModifier
from sparseml.modifiers.training import (
    EpochRangeModifier,
    LearningRateFunctionModifier,
    SetLearningRateModifier,
    SetWeightDecayModifier,
)

# Second-order pruner families, each in its own module.
_FAMILIES = {
    "obs": ["OBSPruningModifier"],
    "cap": ["CAPruningModifier"],
    "fast_cap": ["FastCAPruningModifier"],
    "mfac": ["MFACPruningModifier"],
}
for _module, _names in _FAMILIES.items():
    try:
        _mod = import_module(f"sparseml.modifiers.{_module}")
    except ModuleNotFoundError as _err:  # family not built yet in this checkout
        if _err.name != f"sparseml.modifiers.{_module}":
            raise
        continue
    for _name in _names:
        globals()[_name] = getattr(_mod, _name)

__all__ = [
    "ConstantPruningModifier",
    "EpochRangeModifier",
    "GMPruningModifier",
    "GlobalMagnitudePruningModifier",
    "LearningRateFunctionModifier",
    "MagnitudePruningModifier",
    "Modifier",
    "PruningModifier",
    "SetLearningRateModifier",
    "SetWeightDecayModifier",
]
