"""The precision pruning math runs in, whatever the model's dtype.

Scores, thresholds and weight updates are computed in float32, or in float64 when a model
holds float64 weights; half-precision weights (float16, bfloat16) are upcast exactly before
any arithmetic and only the final weights are cast back. Ranking scores in half precision
would underflow small saliencies to 0 (ties broken by index) and flip near-ties.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def work_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64, else float32."""
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


# Entries of an operand upcast to float64 at a time (32 MiB), so exact float64 products cost a
# bounded temporary instead of a float64 copy of a whole gradient matrix.
UPCAST_NUMEL = 1 << 22


def matmul64(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in float64 for a (r, n) and b (n, c) or (n,), upcast slice by slice.

    Products of float32 (or half) numbers are exact in float64, so only the float64 sums
    round: a Gram G G^T of float32 gradients keeps ~1e-16 relative accuracy instead of
    eps_32 * ||G G^T||, which damp / ||G G^T|| down to 1e-10 needs. The larger of the
    contraction (n) and output (c) dimensions is sliced, at most ``UPCAST_NUMEL`` entries of
    an operand at a time.
    """
    r, n = a.shape
    vector = b.dim() == 1
    c = 1 if vector else b.shape[1]
    if not vector and c > n:  # e.g. (1, k) @ (k, d): slice the output columns
        out = torch.empty(r, c, dtype=torch.float64, device=a.device)
        a64 = a.double()
        step = max(1, UPCAST_NUMEL // max(n, 1))
        for s in range(0, c, step):
            out[:, s : s + step] = a64 @ b[:, s : s + step].to(a.device, torch.float64)
        return out
    out = torch.zeros((r,) if vector else (r, c), dtype=torch.float64, device=a.device)
    step = max(1, UPCAST_NUMEL // max(r, c, 1))
    for s in range(0, n, step):
        out += a[:, s : s + step].double() @ b[s : s + step].to(a.device, torch.float64)
    return out


def gram64(x: Tensor) -> Tensor:
    """``x @ x.T`` (r, r) in float64 for x (r, n): `matmul64` with one upcast per slice."""
    step = max(1, UPCAST_NUMEL // max(x.shape[0], 1))
    out = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[1], step):
        xs = x[:, s : s + step].double()
        out.addmm_(xs, xs.T)
    return out


def bmm64(a: Tensor, b: Tensor) -> Tensor:
    """Batched ``a @ b`` (k, r, n) x (k, n, c) in float64, upcasting a few batch entries at a time."""
    k = a.shape[0]
    per = max(a[0].numel(), b[0].numel(), 1)
    step = max(1, UPCAST_NUMEL // per)
    out = torch.empty(k, a.shape[1], b.shape[2], dtype=torch.float64, device=a.device)
    for s in range(0, k, step):
        out[s : s + step] = torch.bmm(a[s : s + step].double(), b[s : s + step].double())
    return out
