"""The diagonal of the loss Hessian from Hessian-vector products (double backprop).

Two estimators of diag(H), H the Hessian of the mini-batch loss averaged over m batches:

- ``exact``: per batch, H e_q for every unit vector e_q, i.e. one double-backward pass per
  selected weight (d passes per batch; tiny models only), summing e_q * (H e_q) = H_qq e_q.
- ``hutchinson``: per batch one Rademacher probe z (entries +-1), z * (H z), whose expectation
  is diag(H) since E[z z^T] = I (Bekas, Kokiopoulou & Saad 2007; Hutchinson 1990). For a fixed
  H the variance of one probe's entry q is sum_{j != q} H_qj^2, so after m probes the standard
  error of H_qq is sqrt(sum_{j != q} H_qj^2 / m), on top of the batch-to-batch variance of H.

The products come from `sparseml.grad_sampler.GradSampler.iter_hessian_products`; each rank
estimates from its own batches (with the same probes) and the estimates are averaged over the
ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from sparseml import dist

_MIX = 0x9E3779B97F4A7C15


def probe_seed(sampler_state: dict[str, int]) -> int:
    """A probe seed fixed by the sample stream's position (so a resumed run draws the same
    probes). Every rank draws the same probes: averaging z * (H_r z) over the ranks is then
    z * (H z) for the Hessian H of the loss over all ranks' batches, as one process with a
    W times larger batch would compute it."""
    s = sampler_state
    return (s["seed"] + _MIX * (s["passes"] + 3 * s["position"] + 1)) % 2**63


def rademacher_probes(
    sizes: list[int], devices: list[torch.device], dtype: torch.dtype, seed: int
) -> Callable[[], Iterator[list[Tensor]]]:
    """A factory of one probe per call: per parameter, (numel,) entries +-1 in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def one() -> Iterator[list[Tensor]]:
        yield [
            (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(d, dtype)
            for n, d in zip(sizes, devices)
        ]

    return one


def unit_vectors(
    sizes: list[int], devices: list[torch.device], dtype: torch.dtype
) -> Callable[[], Iterator[list[Tensor]]]:
    """A factory of all d unit vectors e_q (one parameter's piece holds the 1), lazily."""

    def every() -> Iterator[list[Tensor]]:
        for i, n in enumerate(sizes):
            for q in range(n):
                v = [torch.zeros(m, dtype=dtype, device=d) for m, d in zip(sizes, devices)]
                v[i][q] = 1.0
                yield v

    return every


def hessian_diagonal(
    pairs: Iterable[tuple[list[Tensor], list[Tensor]]], sizes: list[int], num_batches: int
) -> list[Tensor]:
    """diag(H) per parameter (float64): sum of v * (H v) over ``pairs`` / ``num_batches``,
    averaged over the ranks. ``pairs`` hold, per batch, the probes (Hutchinson) or all unit
    vectors (exact) with their products."""
    sums: list[Tensor] | None = None
    for v, hv in pairs:
        terms = [a.to(torch.float64) * b.to(a.device, torch.float64) for a, b in zip(v, hv)]
        if sums is None:
            sums = terms
        else:
            for s, t in zip(sums, terms):
                s += t
    if sums is None:
        raise ValueError("no Hessian-vector products were given")
    out = [s / num_batches for s in sums]
    dist.all_reduce_mean_(out, torch.float64)
    return out
