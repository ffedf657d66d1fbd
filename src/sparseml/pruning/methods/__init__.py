"""The built-in pruning methods, one module each; importing this package registers their
recipe tags (``@register_modifier``)."""

from sparseml.pruning.methods import (  # noqa: F401  (imported for their registrations)
    cap,
    diagonal,
    fast_cap,
    gwprod,
    kfac,
    magnitude,
    mfac,
    obs,
    woodfisher,
    woodtaylor,
)
from sparseml.pruning.methods.cap import CAPruningModifier
from sparseml.pruning.methods.diagonal import DiagFisherPruningModifier, HessianDiagPruningModifier
from sparseml.pruning.methods.fast_cap import FastCAPruningModifier
from sparseml.pruning.methods.gwprod import GWProdPruningModifier
from sparseml.pruning.methods.kfac import KFACPruningModifier
from sparseml.pruning.methods.magnitude import (
    ConstantPruningModifier,
    GlobalMagnitudePruningModifier,
    GMPruningModifier,
    MagnitudePruningModifier,
)
from sparseml.pruning.methods.mfac import MFACPruningModifier
from sparseml.pruning.methods.obs import OBSPruningModifier
from sparseml.pruning.methods.woodfisher import WoodFisherPruningModifier
from sparseml.pruning.methods.woodtaylor import WoodTaylorPruningModifier

__all__ = [
    "CAPruningModifier",
    "ConstantPruningModifier",
    "DiagFisherPruningModifier",
    "FastCAPruningModifier",
    "GMPruningModifier",
    "GWProdPruningModifier",
    "GlobalMagnitudePruningModifier",
    "HessianDiagPruningModifier",
    "KFACPruningModifier",
    "MFACPruningModifier",
    "MagnitudePruningModifier",
    "OBSPruningModifier",
    "WoodFisherPruningModifier",
    "WoodTaylorPruningModifier",
]
