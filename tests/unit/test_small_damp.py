"""Fisher inverses at small dampening, against exact rational arithmetic.

Gradients are float32 and rank-deficient (linearly dependent coordinates, as dead or tied features give),
so F = damp*I + G^T G / m has eigenvalues damp and ~||S||: a float32 Gram is off by
~eps_32 ||S|| / damp relative (or not positive definite at all). The oracle inverts F exactly
with ``fractions.Fraction`` from the float32 values, so it is independent of any float math.
Error = max |H - H_exact| / max |H_exact|.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from bench.exact_oracle import exact_fisher_inverse, rank_deficient_grads, rel_error, spectral_scale
from sparseml.errors import NumericalError
from sparseml.kernels.fisher_build import block_fisher_inverse
from sparseml.kernels.mfac import MFACInverse
from sparseml.optim.mfac import MFAC


@pytest.mark.parametrize("ratio", [1e-6, 1e-8, 1e-10])
def test_block_fisher_accurate_at_small_damp(ratio: float) -> None:
    g = rank_deficient_grads(24, 16)  # m = 24 >= B = 8: the Gram path
    damp = ratio * spectral_scale(g[:, :8])
    H = block_fisher_inverse(g, 8, damp, chunk_size=5)
    assert rel_error(H[0], exact_fisher_inverse(g[:, :8], damp)) < 1e-5
    assert rel_error(H[1], exact_fisher_inverse(g[:, 8:], damp)) < 1e-5


def test_float32_gram_is_what_fails_there() -> None:
    """The control: the same build with a float32 Gram is far off or not positive definite."""
    g = rank_deficient_grads(24, 16)
    damp = 1e-8 * spectral_scale(g[:, :8])
    try:
        H = block_fisher_inverse(g, 8, damp, gram_dtype=torch.float32)
    except NumericalError:
        return
    assert rel_error(H[0], exact_fisher_inverse(g[:, :8], damp)) > 1e-3


@pytest.mark.parametrize("ratio", [1e-6, 1e-10])
@pytest.mark.parametrize("block", [None, 6, 12], ids=["full", "B<m", "B>=m"])
def test_mfac_accurate_at_small_damp(ratio: float, block: int | None) -> None:
    g = rank_deficient_grads(8, 12, seed=1)
    damp = ratio * spectral_scale(g)
    inv = MFACInverse.build(g.clone(), damp, block)
    size = block or 12
    exact = [exact_fisher_inverse(g[:, s : s + size], damp) for s in range(0, 12, size)]
    diag = torch.cat([torch.tensor([float(e[i][i]) for i in range(len(e))]) for e in exact])
    scale = max(float(abs(v)) for e in exact for row in e for v in row)
    assert float((inv.diag().double() - diag.double()).abs().max()) / scale < 1e-5
    x = torch.randn(12, generator=torch.Generator().manual_seed(3))
    want = torch.cat(
        [
            torch.tensor([float(sum(v * Fraction(float(x[s + j])) for j, v in enumerate(row)))
                          for row in e], dtype=torch.float64)
            for s, e in zip(range(0, 12, size), exact)
        ]
    )  # fmt: skip
    assert float((inv.mul(x).double() - want).abs().max() / want.abs().max()) < 1e-5


def test_mfac_optimizer_step_accurate_at_small_damp() -> None:
    """Two steps of the M-FAC optimizer (window of 2) against the exact F^-1 g."""
    g = rank_deficient_grads(2, 12, seed=2)
    damp = 1e-9 * spectral_scale(g)
    p = torch.nn.Parameter(torch.zeros(12))
    opt = MFAC([p], lr=1.0, damp=damp, ngrads=2)
    for row in g:
        before = p.detach().clone()
        p.grad = row.clone()
        opt.step()
    update = (before - p.detach()).double()
    exact = exact_fisher_inverse(g, damp)
    want = torch.tensor(
        [float(sum(v * Fraction(float(x)) for v, x in zip(r, g[1]))) for r in exact],
        dtype=torch.float64,
    )
    assert float((update - want).abs().max() / want.abs().max()) < 1e-5


def test_mfac_optimizer_fast_mode_is_the_float32_build() -> None:
    """exact=False: float32 Gram products (the faster, less accurate option)."""
    g = rank_deficient_grads(2, 12, seed=2)
    damp = 1e-2 * spectral_scale(g)
    updates = {}
    for exact in (True, False):
        p = torch.nn.Parameter(torch.zeros(12))
        opt = MFAC([p], lr=1.0, damp=damp, ngrads=2, exact=exact)
        for row in g:
            p.grad = row.clone()
            opt.step()
        updates[exact] = p.detach().clone()
    torch.testing.assert_close(updates[False], updates[True], rtol=1e-4, atol=1e-5)
