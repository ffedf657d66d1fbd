"""Fisher inverses at small dampening, against exact rational arithmetic.

Gradients are float32 and rank-deficient (duplicated columns, as dead or tied features give),
so F = damp*I + G^T G / m has eigenvalues damp and ~||S||: a float32 Gram is off by
~eps_32 ||S|| / damp relative (or not positive definite at all). The oracle inverts F exactly
with ``fractions.Fraction`` from the float32 values, so it is independent of any float math.
Error = max |H - H_exact| / max |H_exact|.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from sparseml.errors import NumericalError
from sparseml.kernels.fisher import block_fisher_inverse
from sparseml.kernels.mfac import MFACInverse
from sparseml.optim.mfac import MFAC


def rank_deficient_grads(m: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, d, generator=gen)
    # every block has a (numerically) null space of dimension 2
    g[:, 1::4] = g[:, 0::4] + g[:, 2::4]
    g[:, 3::4] = 0.5 * g[:, 0::4] - 3 * g[:, 2::4]
    return g  # float32


def exact_inverse(g: torch.Tensor, damp: float) -> list[list[Fraction]]:
    """inv(damp*I + g^T g / m) by Gauss-Jordan in exact rationals; g (m, k) float32."""
    m, k = g.shape
    cols = [[Fraction(float(v)) for v in g[:, j]] for j in range(k)]
    lam = Fraction(damp)
    a = [
        [
            sum(x * y for x, y in zip(cols[i], cols[j])) / m + (lam if i == j else 0)
            for j in range(k)
        ]
        + [Fraction(int(i == j)) for j in range(k)]
        for i in range(k)
    ]
    for c in range(k):
        p = next(r for r in range(c, k) if a[r][c] != 0)
        a[c], a[p] = a[p], a[c]
        piv = a[c][c]
        a[c] = [v / piv for v in a[c]]
        for r in range(k):
            if r != c and a[r][c] != 0:
                f = a[r][c]
                a[r] = [v - f * w for v, w in zip(a[r], a[c])]
    return [row[k:] for row in a]


def rel_error(got: torch.Tensor, exact: list[list[Fraction]]) -> float:
    ref = torch.tensor([[float(v) for v in row] for row in exact], dtype=torch.float64)
    return float((got.double() - ref).abs().max() / ref.abs().max())


def spectral_scale(g: torch.Tensor) -> float:
    """||G^T G / m||_2 in float64."""
    g = g.double()
    return float(torch.linalg.matrix_norm(g.T @ g / g.shape[0], ord=2))


@pytest.mark.parametrize("ratio", [1e-6, 1e-8, 1e-10])
def test_block_fisher_accurate_at_small_damp(ratio: float) -> None:
    g = rank_deficient_grads(24, 16)  # m = 24 >= B = 8: the Gram path
    damp = ratio * spectral_scale(g[:, :8])
    H = block_fisher_inverse(g, 8, damp, chunk_size=5)
    assert rel_error(H[0], exact_inverse(g[:, :8], damp)) < 1e-5
    assert rel_error(H[1], exact_inverse(g[:, 8:], damp)) < 1e-5


def test_float32_gram_is_what_fails_there() -> None:
    """The control: the same build with a float32 Gram is far off or not positive definite."""
    g = rank_deficient_grads(24, 16)
    damp = 1e-8 * spectral_scale(g[:, :8])
    try:
        H = block_fisher_inverse(g, 8, damp, gram_dtype=torch.float32)
    except NumericalError:
        return
    assert rel_error(H[0], exact_inverse(g[:, :8], damp)) > 1e-3


@pytest.mark.parametrize("ratio", [1e-6, 1e-10])
@pytest.mark.parametrize("block", [None, 6, 12], ids=["full", "B<m", "B>=m"])
def test_mfac_accurate_at_small_damp(ratio: float, block: int | None) -> None:
    g = rank_deficient_grads(8, 12, seed=1)
    damp = ratio * spectral_scale(g)
    inv = MFACInverse.build(g.clone(), damp, block)
    size = block or 12
    exact = [exact_inverse(g[:, s : s + size], damp) for s in range(0, 12, size)]
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
    exact = exact_inverse(g, damp)
    want = torch.tensor(
        [float(sum(v * Fraction(float(x)) for v, x in zip(r, g[1]))) for r in exact],
        dtype=torch.float64,
    )
    assert float((update - want).abs().max() / want.abs().max()) < 1e-5
