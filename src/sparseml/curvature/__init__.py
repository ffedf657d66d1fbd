"""The one place where gradient samples become curvature estimates.

Every pruner asks this package for its estimate, with explicit arguments (never by reading
attributes of the caller). Inputs are *gradient chunks*: an iterable of lists with one
``(c, numel_i)`` tensor of c samples per selected parameter (what
`sparseml.grad_sampler.GradSampler.iter_chunks` yields); estimates that need more than
gradients (K-FAC's layer inputs, the Hessian diagonal's second derivatives) take the model and
a batch source instead.

| function | estimate | memory per rank |
|---|---|---|
| `block_fisher_inverses` | (lambda I + G_b^T G_b / m)^-1 per block of B weights | (d/B) B(B+1)/2 float64 (packed) |
| `shared_block_fishers` | one B x B Gram sum per parameter (FastCAP) | B^2 per parameter |
| `unpruned_gradients` + `matrix_free_inverse` | M-FAC inverse of the full (or blocked) Fisher | m d |
| `GradientMoments` | mean gradient and diagonal empirical Fisher | 2 d float64 |
| `gradient_sums` | sum of g (or of abs(g)) over the samples (GWProd) | d float64 |
| `kfac_factors` + `damped_inverses` | K-FAC G^-1 (x) A^-1 per Linear/Conv2d layer | sum out^2 + in^2 |
| `hessian_diagonal` | diag of the loss Hessian (exact or Hutchinson) | d float64 |

The kernels behind these (`sparseml.kernels.fisher_build.BlockFisherBuilder`, `kernels.mfac`) are the
same entry points the benchmarks time.

Like the kernels, this package raises ``ValueError`` / ``RuntimeError`` for bad arguments (a
caller's bug) and `sparseml.errors.NumericalError` for bad numbers, never a user error.
"""

from sparseml.curvature.block import block_fisher_inverses, shared_block_fishers
from sparseml.curvature.hessian import (
    hessian_diagonal,
    probe_seed,
    rademacher_probes,
    unit_vectors,
)
from sparseml.curvature.kfac import (
    KFACFactors,
    damped_inverses,
    kfac_factors,
    kfac_inverse_diag,
    kfac_matvec,
)
from sparseml.curvature.matrix_free import matrix_free_inverse, unpruned_gradients
from sparseml.curvature.moments import GradientMoments, gradient_sums, tapped

__all__ = [
    "GradientMoments",
    "KFACFactors",
    "damped_inverses",
    "gradient_sums",
    "hessian_diagonal",
    "kfac_factors",
    "kfac_inverse_diag",
    "kfac_matvec",
    "probe_seed",
    "rademacher_probes",
    "unit_vectors",
    "block_fisher_inverses",
    "matrix_free_inverse",
    "shared_block_fishers",
    "tapped",
    "unpruned_gradients",
]
