"""Recipe modifiers. Each module registers its own tags (``@register_modifier``) when it is
imported; importing this package imports every built-in module, so every built-in tag exists.
A pruner of one's own registers the same way: define it in any module and import that module.
"""

from sparseml.modifiers import (  # noqa: F401  (imported for their registrations)
    cap,
    diagonal,
    fast_cap,
    gwprod,
    kfac,
    magnitude,
    mfac,
    obs,
    quantization,
    training,
    woodfisher,
    woodtaylor,
)
from sparseml.modifiers.base import Modifier
from sparseml.modifiers.cap import CAPruningModifier
from sparseml.modifiers.diagonal import DiagFisherPruningModifier, HessianDiagPruningModifier
from sparseml.modifiers.fast_cap import FastCAPruningModifier
from sparseml.modifiers.gwprod import GWProdPruningModifier
from sparseml.modifiers.kfac import KFACPruningModifier
from sparseml.modifiers.magnitude import (
    ConstantPruningModifier,
    GlobalMagnitudePruningModifier,
    GMPruningModifier,
    MagnitudePruningModifier,
)
from sparseml.modifiers.mfac import MFACPruningModifier
from sparseml.modifiers.obs import OBSPruningModifier
from sparseml.modifiers.pruning import PruningModifier
from sparseml.modifiers.quantization import QuantizationModifier
from sparseml.modifiers.training import (
    EpochRangeModifier,
    LearningRateFunctionModifier,
    LearningRateModifier,
    SetLearningRateModifier,
    SetWeightDecayModifier,
)
from sparseml.modifiers.woodfisher import WoodFisherPruningModifier
from sparseml.modifiers.woodtaylor import WoodTaylorPruningModifier

__all__ = [
    "CAPruningModifier",
    "ConstantPruningModifier",
    "DiagFisherPruningModifier",
    "EpochRangeModifier",
    "FastCAPruningModifier",
    "GMPruningModifier",
    "GWProdPruningModifier",
    "GlobalMagnitudePruningModifier",
    "HessianDiagPruningModifier",
    "KFACPruningModifier",
    "LearningRateFunctionModifier",
    "LearningRateModifier",
    "MFACPruningModifier",
    "MagnitudePruningModifier",
    "Modifier",
    "OBSPruningModifier",
    "PruningModifier",
    "QuantizationModifier",
    "SetLearningRateModifier",
    "SetWeightDecayModifier",
    "WoodFisherPruningModifier",
    "WoodTaylorPruningModifier",
]
