"""Static M-FAC inverse-Fisher kernel in BLAS-3 (Gram + Cholesky + GEMM) form.

Paper: "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
E. Frantar, E. Kurtic, D. Alistarh, arXiv 2107.03356, https://arxiv.org/abs/2107.03356

The damped empirical Fisher of m gradients (rows of G, shape (m, d)) is
F = damp * I + (1/m) G^T G. Woodbury gives F^-1 = I/damp - G^T A^-1 G / damp^2 with the
m x m matrix A = m * I + G G^T / damp. With A = L L^T and Z = L^-1 G (m, d):

    diag(F^-1) = 1/damp - colsumsq(Z) / damp^2
    F^-1 x     = x/damp - Z^T (Z x) / damp^2

The paper's recursion (v_i, d_i) is non-pivoted elimination of the same A, so both forms are
the same exact inverse; `mfac_recursion_reference` keeps the recursion for tests and benchmarks.
Here the m^2 d flops run as two GEMMs (G G^T and L^-1 G) instead of m sequential GEMV passes.
The m x m factor (Gram accumulation, Cholesky, triangular inverse) is kept in float64, the
Gram's products included (`gram64`: exact products of float32 entries), so small damp does
not lose accuracy; Z is stored in the dtype of G. Applying L^-1 as a GEMM is several times faster than a TRSM on CPU.

Blocked variant: consecutive chunks of `block_size` coordinates are independent Fishers; the last
block is zero-padded (zero gradient coordinates are decoupled, so padding does not change the
real ones). Blocks with block_size >= m use the Z form; blocks with block_size < m store the
explicit B x B inverse, which is smaller (d*B < d*m) and cheaper to build.

Paging: `num_pages` splits the columns (full) or the blocks (blocked) into chunks processed one
after the other, so the temporaries are about m*d/num_pages (blocked: also at most 2^25
entries per chunk, as its blocks are regrouped by a copy); the full variant with
`overwrite=True` also writes Z into G chunk by chunk, as the reference does with its v vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseml.errors import NumericalError
from sparseml.kernels.precision import bmm64, gram64

__all__ = ["MFACInverse", "mfac_recursion_reference", "recursion_diag", "recursion_mul"]

# columns per pass of diag's sum of squares (a cache-sized accumulator); the sums stay in the
# dtype of Z (its own rounding is of the same order) and only the final subtraction is float64
_SUBCHUNK = 1 << 15
_BLOCK_CHUNK = 1 << 25  # gradient entries regrouped into (k, m, B) at a time by the blocked build


def _check_damp(damp: float) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"M-FAC damp must be a finite number > 0, got {damp!r}")
    if damp == float("inf"):
        raise ValueError(f"M-FAC damp must be a finite number > 0, got {damp!r}")
    return float(damp)


def _check_grads(grads: Tensor) -> None:
    if not isinstance(grads, Tensor) or grads.dim() != 2 or not grads.is_floating_point():
        got = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"M-FAC grads must be a floating tensor of shape (m, d), got {got}")
    if grads.shape[0] < 1 or grads.shape[1] < 1:
        raise ValueError(f"M-FAC grads needs m >= 1 and d >= 1, got shape {tuple(grads.shape)}")
    # column chunks: torch.isfinite on all of G would allocate about 1.7x its size in temporaries
    step = max(1, (1 << 22) // grads.shape[0])
    for i in range(0, grads.shape[1], step):
        if not bool(torch.isfinite(grads[:, i : i + step]).all()):
            raise NumericalError("M-FAC grads contain NaN or Inf values")


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"M-FAC {name} must be an integer >= 1, got {value!r}")
    return value


def _splits(n: int, parts: int) -> list[tuple[int, int]]:
    """Split range(n) into min(parts, n) contiguous, nearly equal (start, stop) pieces."""
    parts = min(parts, n)
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _colsumsq(rows: Tensor) -> Tensor:
    """sum_r rows[r]**2 for rows of shape (m, ...): m passes over a cache-sized accumulator,
    several times faster than square().sum(0), which makes a temporary and reduces strided."""
    out = torch.zeros_like(rows[0])
    for row in rows:
        out.addcmul_(row, row)
    return out


def _chol(mat: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of a (batched) SPD float64 matrix, NumericalError if it fails."""
    factor, info = torch.linalg.cholesky_ex(mat)
    if bool((info != 0).any()):
        raise NumericalError(f"M-FAC: {what} is not positive definite (Cholesky failed)")
    return factor


def _lower_inverse(lower: Tensor) -> Tensor:
    """L^-1 for a (batched) lower-triangular float64 L of shape (..., m, m)."""
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)


class MFACInverse:
    """F^-1 for F = damp*I + (1/m) G^T G, blockwise or full, queried by `diag` and `mul`.

    Build with `MFACInverse.build`; the constructor only stores the pieces. `chunks[i]` covers
    coordinates `bounds[i]` and is (m, n_i) for the full variant, (k_i, m, B) for blocks in the
    Z form and (k_i, B, B) for explicit blocks (the last block of the last chunk is padded).
    """

    def __init__(
        self,
        damp: float,
        dim: int,
        block_size: int | None,
        chunks: list[Tensor],
        bounds: list[tuple[int, int]],
        explicit: bool = False,
        mean_coef: Tensor | None = None,
    ) -> None:
        self.damp = damp
        self.mean_coef = mean_coef  # full variant: L^-1 1 (m,), float64; see mean_gradient_mul
        self.dim = dim
        self.block_size = block_size
        self.chunks = chunks
        self.bounds = bounds
        self.explicit = explicit  # blocks hold B x B inverses (block_size < m)

    @classmethod
    def build(
        cls,
        grads: Tensor,
        damp: float,
        block_size: int | None = None,
        num_pages: int = 1,
        overwrite: bool = False,
    ) -> MFACInverse:
        """Factor the Fisher of `grads` (m, d). Costs m^2 d flops for the full variant.

        block_size: None for one d x d Fisher, else the number of consecutive coordinates per
            independent block (the last one may be shorter).
        num_pages: process the columns (or blocks) in this many chunks to bound temporaries.
        overwrite: full variant only; store Z in the storage of `grads` (which is destroyed).
        """
        damp = _check_damp(damp)
        num_pages = _check_count("num_pages", num_pages)
        if block_size is not None:
            block_size = _check_count("block_size", block_size)
            if overwrite:
                raise ValueError("M-FAC overwrite=True needs block_size=None (full variant)")
        _check_grads(grads)
        m, d = grads.shape
        if block_size is None:
            chunks, bounds, mean_coef = _build_full(grads, damp, num_pages, overwrite)
            return cls(damp, d, None, chunks, bounds, mean_coef=mean_coef)
        block = min(block_size, d)
        nblocks = -(-d // block)
        chunks, bounds = [], []
        # blocks are regrouped (copied) chunk by chunk, so also bound a chunk's size
        chunks_needed = max(num_pages, -(-m * nblocks * block // _BLOCK_CHUNK))
        for b0, b1 in _splits(nblocks, chunks_needed):
            start, stop = b0 * block, min(b1 * block, d)
            cols = grads[:, start:stop]
            if stop - start < (b1 - b0) * block:
                cols = torch.nn.functional.pad(cols, (0, (b1 - b0) * block - (stop - start)))
            blocks = cols.reshape(m, b1 - b0, block).transpose(0, 1)  # (k, m, B)
            chunks.append(_build_blocks(blocks, damp))
            bounds.append((start, stop))
        return cls(damp, d, block, chunks, bounds, explicit=block < m)

    def diag(self) -> Tensor:
        """diag(F^-1), shape (d,), in the dtype of the gradients."""
        out = []
        for chunk, (start, stop) in zip(self.chunks, self.bounds):
            if self.explicit:
                out.append(chunk.diagonal(dim1=-2, dim2=-1).reshape(-1)[: stop - start])
                continue
            if self.block_size is None:
                parts = [
                    _colsumsq(chunk[:, i : i + _SUBCHUNK])
                    for i in range(0, chunk.shape[1], _SUBCHUNK)
                ]
            else:
                step = max(1, _SUBCHUNK // self.block_size)
                parts = [
                    _colsumsq(chunk[i : i + step].transpose(0, 1)).reshape(-1)
                    for i in range(0, chunk.shape[0], step)
                ]
            sumsq = torch.cat(parts)
            diag = 1.0 / self.damp - sumsq[: stop - start].double() / self.damp**2
            out.append(diag.to(chunk.dtype))
        return torch.cat(out)

    def mean_gradient_mul(self) -> Tensor:
        """F^-1 g_bar for g_bar the mean of the gradients the full inverse was built from,
        shape (d,), in the dtype of the gradients (WoodTaylor's h = H g_bar).

        Why not ``mul(g_bar)``: g_bar lies in the span of the gradients, where the two terms
        x/damp and Z^T (Z x)/damp^2 are both ~|g_bar|/damp and nearly cancel; at damp 1e-5
        float32 kept few correct digits (99.4% of the masks, weight error 0.31; damp 1e-7:
        70%). Push-through (F^-1 G^T = G^T (damp I + G G^T/m)^-1) gives the same vector as one
        term without cancellation: F^-1 G^T 1/m = Z^T (L^-1 1) / damp, summed in float64.
        """
        if self.mean_coef is None:
            raise ValueError("mean_gradient_mul needs the full variant (block_size=None)")
        out = []
        for z in self.chunks:
            step = _SUBCHUNK // 8  # float64 copies of m x step entries at a time
            parts = [
                self.mean_coef @ z[:, i : i + step].double() for i in range(0, z.shape[1], step)
            ]
            out.append((torch.cat(parts) / self.damp).to(z.dtype))
        return torch.cat(out)

    def mul(self, x: Tensor) -> Tensor:
        """F^-1 x for x of shape (d,), returned in the dtype of the gradients.

        Accurate for x with a large component outside the gradients' span (OBS's e_q steps);
        for the mean gradient use `mean_gradient_mul` (see there)."""
        if not isinstance(x, Tensor) or x.shape != (self.dim,):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"M-FAC mul expects a vector of shape ({self.dim},), got {got}")
        dtype = self.chunks[0].dtype
        x = x.to(device=self.chunks[0].device, dtype=dtype)
        if self.block_size is None:
            coef = sum((z @ x[a:b]).double() for z, (a, b) in zip(self.chunks, self.bounds))
            coef = (coef / self.damp**2).to(dtype)
            return torch.cat(
                [x[a:b] / self.damp - coef @ z for z, (a, b) in zip(self.chunks, self.bounds)]
            )
        out = []
        for chunk, (start, stop) in zip(self.chunks, self.bounds):
            xb = torch.zeros(chunk.shape[0] * self.block_size, dtype=dtype, device=x.device)
            xb[: stop - start] = x[start:stop]
            xb = xb.view(chunk.shape[0], self.block_size, 1)
            if self.explicit:
                yb = (chunk @ xb).squeeze(-1)
            else:
                coef = chunk @ xb  # (k, m, 1)
                yb = xb.squeeze(-1) / self.damp - (chunk.transpose(1, 2) @ coef).squeeze(-1) / (
                    self.damp**2
                )
            out.append(yb.reshape(-1)[: stop - start])
        return torch.cat(out)


def _build_full(
    grads: Tensor, damp: float, num_pages: int, overwrite: bool
) -> tuple[list[Tensor], list, Tensor]:
    m, d = grads.shape
    bounds = _splits(d, num_pages)
    gram = torch.zeros(m, m, dtype=torch.float64, device=grads.device)
    for a, b in bounds:
        page = grads[:, a:b]
        gram += gram64(page)
    gram /= damp
    gram.diagonal().add_(m)
    lower_inv64 = _lower_inverse(_chol(gram, "A = m*I + G G^T / damp"))
    mean_coef = lower_inv64.sum(dim=1)  # L^-1 1: F^-1 g_bar = Z^T (L^-1 1) / damp
    lower_inv = lower_inv64.to(grads.dtype)
    chunks = []
    for a, b in bounds:
        z = lower_inv @ grads[:, a:b]
        if overwrite:
            grads[:, a:b] = z
            z = grads[:, a:b]
        chunks.append(z)
    return chunks, bounds, mean_coef


def _build_blocks(blocks: Tensor, damp: float) -> Tensor:
    """(k, m, B) gradient blocks -> (k, m, B) Z factors (B >= m) or (k, B, B) inverses."""
    _, m, block = blocks.shape
    if block < m:
        fisher = bmm64(blocks.transpose(1, 2), blocks) / m
        fisher.diagonal(dim1=-2, dim2=-1).add_(damp)
        inv = torch.cholesky_inverse(_chol(fisher, "a Fisher block"))
        return inv.to(blocks.dtype)
    gram = bmm64(blocks, blocks.transpose(1, 2)) / damp
    gram.diagonal(dim1=-2, dim2=-1).add_(m)
    lower_inv = _lower_inverse(_chol(gram, "a block of A = m*I + G G^T / damp"))
    return lower_inv.to(blocks.dtype) @ blocks


def mfac_recursion_reference(grads: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """The paper's sequential m-step recursion, as m BLAS-2 passes.

    grads: (m, d). Returns V (m, d) and den (m,) in the dtype of `grads`, with
    v_i = g_i/damp - sum_{k<i} (v_k . g_i / den_k) v_k and den_i = m + g_i . v_i.
    """
    damp = _check_damp(damp)
    _check_grads(grads)
    m = grads.shape[0]
    vecs = torch.empty_like(grads)
    den = torch.empty(m, dtype=grads.dtype, device=grads.device)
    for i in range(m):
        g = grads[i]
        v = g / damp
        if i > 0:
            v -= vecs[:i].T @ ((vecs[:i] @ g) / den[:i])
        vecs[i] = v
        den[i] = m + g @ v
    return vecs, den


def recursion_diag(vecs: Tensor, den: Tensor, damp: float) -> Tensor:
    """diag(F^-1) = 1/damp - sum_i v_i^2 / den_i from `mfac_recursion_reference`."""
    out = torch.full_like(vecs[0], 1.0 / damp)
    for v, dv in zip(vecs, den.tolist()):
        out.addcmul_(v, v, value=-1.0 / dv)
    return out


def recursion_mul(vecs: Tensor, den: Tensor, damp: float, x: Tensor) -> Tensor:
    """F^-1 x = x/damp - sum_i (v_i . x / den_i) v_i from `mfac_recursion_reference`."""
    return x / damp - ((vecs @ x) / den) @ vecs
