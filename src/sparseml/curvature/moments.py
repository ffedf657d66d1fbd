"""First and second moments of gradient samples: the mean gradient and the diagonal Fisher."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

SLICE_NUMEL = 2**20  # float64 temporaries per column slice: 8 MiB, whatever the chunk's size


def column_slices(grads: Tensor) -> list[tuple[int, int]]:
    """Column ranges [a, b) of a (c, d) chunk holding about ``SLICE_NUMEL`` entries each: the
    float64 copies of a slice are a few MiB, not twice the chunk."""
    c, d = grads.shape
    step = max(1, SLICE_NUMEL // max(c, 1))
    return [(a, min(a + step, d)) for a in range(0, d, step)]


class GradientMoments:
    """Running float64 sums of gradient samples and of their squares, per parameter.

    ``mean()`` is the mean gradient g_bar (WoodTaylor's first-order term, GWProd's sum divided
    by m); ``diagonal_fisher()`` is diag(F) = (1/m) sum g^2, the diagonal empirical Fisher.
    """

    def __init__(self, sizes: list[int], device: torch.device | str = "cpu") -> None:
        self.sums = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
        self.squares = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
        self.count = 0

    def add(self, chunk: list[Tensor]) -> None:
        for grads, s, q in zip(chunk, self.sums, self.squares):
            for a, b in column_slices(grads):
                g = grads[:, a:b].to(s.device, torch.float64)
                s[a:b] += g.sum(0)
                q[a:b] += g.square().sum(0)
        self.count += chunk[0].shape[0] if chunk else 0

    def _per_sample(self, sums: list[Tensor]) -> list[Tensor]:
        if self.count < 1:
            raise ValueError("no gradient samples were added")
        return [s / self.count for s in sums]

    def mean(self) -> list[Tensor]:
        return self._per_sample(self.sums)

    def diagonal_fisher(self) -> list[Tensor]:
        return self._per_sample(self.squares)


def tapped(chunks: Iterable[list[Tensor]], moments: GradientMoments) -> Iterator[list[Tensor]]:
    """The same chunks, each also added to ``moments`` (one pass feeds two estimates)."""
    for chunk in chunks:
        moments.add(chunk)
        yield chunk
        del chunk  # not alive while the next chunk is drawn


def gradient_sums(
    chunks: Iterable[list[Tensor]],
    sizes: list[int],
    device: torch.device | str = "cpu",
    absolute: bool = False,
) -> list[Tensor]:
    """Per parameter, the float64 sum over the samples of g (or of |g| with ``absolute``):
    the first-order statistic of the gradient-times-weight (GWProd) scores."""
    sums = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
    for chunk in chunks:
        for grads, s in zip(chunk, sums):
            for a, b in column_slices(grads):
                g = grads[:, a:b].to(s.device, torch.float64)
                s[a:b] += (g.abs() if absolute else g).sum(0)
        chunk = grads = g = None  # not alive while the next chunk is drawn
    return sums
