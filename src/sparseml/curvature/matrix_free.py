"""Matrix-free (M-FAC) inverse Fisher over the unpruned weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from sparseml.kernels.mfac import MFACInverse


def unpruned_gradients(
    chunks: Iterable[list[Tensor]],
    layout,
    num_grads: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """(m, local width) matrix of the samples at this rank's columns of an `UnprunedLayout`."""
    lo, hi = layout.local
    grads = torch.empty(num_grads, hi - lo, device=device, dtype=dtype)
    row = 0
    for chunk in chunks:
        layout.fill(grads[row : row + chunk[0].shape[0]], chunk)
        row += chunk[0].shape[0]
        del chunk  # not alive while the next chunk is drawn
    return grads[:row]


def matrix_free_inverse(
    grads: Tensor, damp: float, block_size: int | None, num_pages: int = 1
) -> MFACInverse:
    """F^-1 with F = damp I + G^T G / m, never formed: full (``block_size`` None) or blocked.

    The full form overwrites ``grads`` (its m x d factor takes their place); see
    `sparseml.kernels.mfac.MFACInverse` for ``diag()`` and ``mul(x)``.
    """
    return MFACInverse.build(grads, damp, block_size, num_pages, overwrite=block_size is None)
