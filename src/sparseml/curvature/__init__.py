"""The one place where gradient samples become curvature estimates.

Every pruner asks this package for its estimate, with explicit arguments (never by reading
attributes of the caller). Inputs are *gradient chunks*: an iterable of lists with one
``(c, numel_i)`` tensor of c samples per selected parameter (what
`sparseml.grad_sampler.GradSampler.iter_chunks` yields); estimates that need more than
gradients (K-FAC's layer inputs, the Hessian diagonal's second derivatives) take the model and
a batch source instead.

| function | estimate | memory per rank |
|---|---|---|
| `block_fisher_inverses` | (lambda I + G_b^T G_b / m)^-1 per block of B weights | (d/B) B^2 float64 |
| `shared_block_fishers` | one B x B Gram sum per parameter (FastCAP) | B^2 per parameter |
| `unpruned_gradients` + `matrix_free_inverse` | M-FAC inverse of the full (or blocked) Fisher | m d |
| `GradientMoments` | mean gradient and diagonal empirical Fisher | 2 d float64 |

The kernels behind these (`sparseml.kernels.fisher.BlockFisherBuilder`, `kernels.mfac`) are the
same entry points the benchmarks time.
"""

from sparseml.curvature.block import block_fisher_inverses, shared_block_fishers
from sparseml.curvature.matrix_free import matrix_free_inverse, unpruned_gradients
from sparseml.curvature.moments import GradientMoments, tapped

__all__ = [
    "GradientMoments",
    "block_fisher_inverses",
    "matrix_free_inverse",
    "shared_block_fishers",
    "tapped",
    "unpruned_gradients",
]
