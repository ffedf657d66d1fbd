"""Estimators: gradient samples (or layer statistics) in, the curvature estimate a method
scores and updates with out; each owns its layout, its memory figure and its build
(`sparseml.pruning.estimators.base`).

| estimator | estimate | used by |
|---|---|---|
| `BlockFisher` | (lambda I + G_b^T G_b / m)^-1 per block of B weights | OBS, WoodTaylor (blocks) |
| `BlockFisherAndMean` | the same and the mean gradient, one pass | WoodTaylor (blocks) |
| `CAPElimination` | block inverses and CAP's greedy order and losses | CAP |
| `SharedFisher` | one B x B Gram per parameter, shared by its rows | FastCAP |
| `FullFisher` | matrix-free inverse over all unpruned weights (and the mean) | WoodFisher, WoodTaylor |
| `MFACFisher` | matrix-free inverse, blocked or full, samples or training gradients | M-FAC |
| `KFAC` | G^-1 (x) A^-1 per Linear/Conv2d layer | K-FAC |
| `DiagonalFisher` | (1/m) sum g^2 | diagonal Fisher |
| `GradientSums` | sum of g or of abs(g) | GWProd |
| `HessianDiagonal` | diag of the loss Hessian (Hutchinson or exact) | Hessian diagonal |
"""

from sparseml.pruning.estimators.base import GRAD_CHUNK, Estimator
from sparseml.pruning.estimators.block import BlockFisher, BlockFisherAndMean, CAPElimination
from sparseml.pruning.estimators.layerwise import (
    KFAC,
    DiagonalFisher,
    GradientSums,
    HessianDiagonal,
)
from sparseml.pruning.estimators.matrix_free import (
    FullFisher,
    MatrixFreeEstimate,
    MFACFisher,
)
from sparseml.pruning.estimators.shared import SharedFisher

__all__ = [
    "GRAD_CHUNK",
    "KFAC",
    "BlockFisher",
    "BlockFisherAndMean",
    "CAPElimination",
    "DiagonalFisher",
    "Estimator",
    "FullFisher",
    "GradientSums",
    "HessianDiagonal",
    "MFACFisher",
    "MatrixFreeEstimate",
    "SharedFisher",
]
