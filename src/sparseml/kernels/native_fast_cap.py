"""Compiled CPU kernel (numba) of FastCAP's column sweep (see `sparseml.kernels.native`).

* `sweep_run`: the rank-1 steps of one lazy run of columns (`sparseml.kernels.fast_cap_sweep`,
  ``Sweep._sweep_block``): each column's errors are formed and pushed onto the run's later
  columns, group by group with each row group's own factor, in one call instead of a few
  tensor operations per column. The trailing update of the later columns stays one GEMM.

Its multiply-adds are fused (one rounding each), as torch's vectorized ``addr_`` and
``addcmul_`` compute them; torch's scalar tail of a row rounds twice, so the two paths agree to
the last bit or two. The torch loop remains the path on accelerators, for N:M masks (whose
picks happen inside the run), for row groups of fewer than MIN_RUN rows and without numba,
and the oracle of this kernel's tests.
"""

from __future__ import annotations

import torch

from sparseml.kernels import native

# Rows per factor run below which the torch steps are kept: the compiled loop reads one
# factor entry per run of rows; runs of 1-2 rows took longer than torch's vectorized update
# (B = 512), 4 rows tied and from 8 rows on it was faster (B = 192, one thread).
MIN_RUN = 8

_sweep_run = None  # the compiled loop, where numba loads
if native.ENABLED:
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


def usable(WT: torch.Tensor, n: int | None, R: int) -> bool:
    """Whether `sweep_run` takes this sweep: numba loaded and switched on (``native.ENABLED``,
    read at each call), unstructured, float64 on CPU, runs of at least MIN_RUN rows."""
    return (
        native.ENABLED
        and _sweep_run is not None
        and n is None
        and R >= MIN_RUN
        and WT.device.type == "cpu"
        and WT.dtype == torch.float64
    )


def sweep_run(
    WT: torch.Tensor, E1: torch.Tensor, U: torch.Tensor, c1: int, r1: int, r2: int, R: int
) -> None:
    """`_sweep_run` on torch tensors (shared memory, no copies): WT (B, N) and E1 (at least r2
    rows, N) C-contiguous float64 on CPU, updated in place; U (G, B, B) float64 upper factors,
    any strides (one entry is read per pair of columns); columns c1 + r1 .. c1 + r2 - 1 of WT
    are swept; R: rows per factor run (N = copies * G * R). The compiled loop checks no
    bounds, so every shape is checked here."""
    if _sweep_run is None:
        raise RuntimeError("the compiled FastCAP kernel is not loaded (numba missing)")
    tensors = (WT, E1, U)
    if any(t.dtype != torch.float64 or t.device.type != "cpu" for t in tensors):
        raise ValueError("sweep_run needs float64 CPU tensors")
    if WT.dim() != 2 or E1.dim() != 2 or U.dim() != 3:
        raise ValueError("sweep_run needs WT (B, N), E1 (cols, N) and U (G, B, B)")
    if not (WT.is_contiguous() and E1.is_contiguous()):
        raise ValueError("sweep_run needs C-contiguous WT and E1")
    (B, N), G = WT.shape, U.shape[0]
    if U.shape[1:] != (B, B) or E1.shape[1] != N or G < 1:
        raise ValueError(
            f"sweep_run: U {tuple(U.shape)} and E1 {tuple(E1.shape)} do not fit WT {(B, N)}"
        )
    if not (c1 >= 0 and 0 <= r1 <= r2 <= E1.shape[0] and c1 + r2 <= B):
        raise ValueError(
            f"sweep_run: columns {c1} + [{r1}, {r2}) outside WT's {B} or E1's {E1.shape[0]}"
        )
    if R < 1 or N % R or (N // R) % G:
        raise ValueError(f"sweep_run needs N = {N} a multiple of R = {R} times G = {G}")
    arrays = (t.detach().numpy() for t in tensors)
    _sweep_run(*arrays, int(c1), int(r1), int(r2), int(R))


def warm_up() -> None:
    """Load (or compile) `_sweep_run` on a tiny problem."""
    if native.ENABLED and _sweep_run is not None:
        WT = torch.zeros(4, 8, dtype=torch.float64, device="cpu")
        E1 = torch.ones(4, 8, dtype=torch.float64, device="cpu")
        sweep_run(WT, E1, torch.eye(4, dtype=torch.float64, device="cpu")[None], 0, 0, 4, 8)
