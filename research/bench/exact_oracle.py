"""Exact rational inverse of a damped empirical Fisher, for accuracy checks at tiny damp.

``exact_fisher_inverse(g, damp)`` inverts F = damp*I + g^T g / m with ``fractions.Fraction``
from the float values of g, so it is independent of any floating-point math (and slow: meant
for k <= ~24 coordinates). Shared by the small-damp tests and the Fisher benchmark.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def exact_fisher_inverse(g: torch.Tensor, damp: float) -> list[list[Fraction]]:
    """inv(damp*I + g^T g / m) for g (m, k), by Gauss-Jordan elimination in rationals."""
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


def as_tensor(exact: list[list[Fraction]]) -> torch.Tensor:
    return torch.tensor([[float(v) for v in row] for row in exact], dtype=torch.float64)


def rel_error(got: torch.Tensor, exact: list[list[Fraction]]) -> float:
    """max |got - exact| / max |exact|."""
    ref = as_tensor(exact)
    return float((got.double() - ref).abs().max() / ref.abs().max())


def rank_deficient_grads(m: int, d: int, seed: int = 0) -> torch.Tensor:
    """float32 (m, d) gradients whose every group of 4 coordinates spans only 2 directions."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, d, generator=gen)
    g[:, 1::4] = g[:, 0::4] + g[:, 2::4]
    g[:, 3::4] = 0.5 * g[:, 0::4] - 3 * g[:, 2::4]
    return g


def spectral_scale(g: torch.Tensor) -> float:
    """||g^T g / m||_2 in float64."""
    g = g.double()
    return float(torch.linalg.matrix_norm(g.T @ g / g.shape[0], ord=2))
