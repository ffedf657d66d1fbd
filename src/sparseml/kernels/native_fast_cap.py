"""Compiled CPU kernel (numba) of FastCAP's column sweep (see `sparseml.kernels.native`).

* `sweep_run`: the rank-1 steps of one lazy run of columns (`sparseml.kernels.fast_cap_sweep`,
  ``Sweep._sweep_block``): each column's errors are formed and pushed onto the run's later
  columns, group by group with each row group's own factor, in one call instead of a few
  tensor operations per column. The trailing update of the later columns stays one GEMM.

Its multiply-adds are fused (one rounding each), as torch's vectorized ``addr_`` and
``addcmul_`` compute them; torch's scalar tail of a row rounds twice, so the two paths agree to
the last bit or two. The torch loop remains the path on accelerators, for N:M masks (whose
picks happen inside the run) and without numba, and the oracle of this kernel's tests.
"""

from __future__ import annotations

import torch

from sparseml.kernels.native import ENABLED

if ENABLED:
    import numba

    @numba.njit(nogil=True, cache=True, fastmath={"contract"})
    def _sweep_run(WT, E1, U, c1, r1, r2, R):
        """Columns c1 + r1 .. c1 + r2 - 1 of WT (B, N) swept in place: for each, E1's row
        (removed / U_jj) becomes its errors (times the column's weights), which move every
        column up to c1 + r2 - 1 (itself included, to ~0) along the factor's row. The N entries
        of a column are runs of R rows, run q under the factor U[q % G] (G = U.shape[0])."""
        G = U.shape[0]
        N = WT.shape[1]
        for j in range(r1, r2):
            cj = c1 + j
            e = E1[j]
            w = WT[cj]
            for t in range(N):
                e[t] *= w[t]
            for k in range(j, r2):
                ck = c1 + k
                wk = WT[ck]
                for q in range(N // R):
                    coef = U[q % G, cj, ck]
                    for t in range(q * R, (q + 1) * R):
                        wk[t] -= coef * e[t]


def usable(WT: torch.Tensor, n: int | None) -> bool:
    """Whether `sweep_run` can take this sweep: numba loaded, unstructured, float64 on CPU."""
    return ENABLED and n is None and WT.device.type == "cpu" and WT.dtype == torch.float64


def sweep_run(
    WT: torch.Tensor, E1: torch.Tensor, U: torch.Tensor, c1: int, r1: int, r2: int, R: int
) -> None:
    """`_sweep_run` on torch tensors (shared memory, no copies): WT (B, N) and E1 (cols, N)
    C-contiguous float64, updated in place; U (G, B, B) float64 upper factors, any strides (it
    is read once per pair of columns); R: rows per factor run (N = copies * G * R)."""
    if not (WT.is_contiguous() and E1.is_contiguous()) or U.dim() != 3:
        raise ValueError("sweep_run needs C-contiguous WT and E1, and U (G, B, B)")
    if WT.shape[1] % R:
        raise ValueError(f"sweep_run needs N = {WT.shape[1]} a multiple of R = {R}")
    _sweep_run(WT.numpy(), E1.numpy(), U.numpy(), int(c1), int(r1), int(r2), int(R))


def warm_up() -> None:
    """Load (or compile) `_sweep_run` on a tiny problem."""
    if ENABLED:
        WT, E1 = torch.zeros(4, 4, dtype=torch.float64), torch.ones(4, 4, dtype=torch.float64)
        sweep_run(WT, E1, torch.eye(4, dtype=torch.float64)[None], 0, 0, 4, 4)
