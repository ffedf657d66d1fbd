"""Oracle tests for the FastCAP kernels (shared Fisher, column sweep with write-back)."""

from __future__ import annotations

import pytest
import torch

from sparseml.errors import NumericalError
from sparseml.kernels.fast_cap import (
    accumulate_shared_fisher,
    fast_cap_prune,
    fast_cap_scores,
    row_scales,
)

f64 = torch.float64


def correlated(rows, cols, seed, corr=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, cols, generator=g, dtype=f64)
    return X + corr * torch.randn(rows, 1, generator=g, dtype=f64) * torch.linspace(1, 2, cols)


def column_obs_reference(
    W, F, num_grads, sparsity, damp, block_size, n=None, m=None, row_scale=None
):
    """Unbatched SparseGPT-style sweep: explicit inverse of F[j:, j:] at every column j; row r's
    unstructured scores are multiplied by row_scale[r] when given."""
    W = W.clone()
    rows, B = W.shape
    Fd = F / num_grads
    Fd = Fd + damp * Fd.diagonal().mean() * torch.eye(B, dtype=f64)
    d = torch.tensor([torch.linalg.inv(Fd[j:, j:])[0, 0] for j in range(B)], dtype=f64)
    removed = torch.zeros_like(W, dtype=torch.bool)
    for c1 in range(0, B, block_size):
        c2 = min(c1 + block_size, B)
        if n is None:  # selection uses the weights at the start of the column block
            s = W[:, c1:c2] ** 2 / d[c1:c2]
            s = (s if row_scale is None else s * row_scale[:, None]).flatten()
            k = round(sparsity * s.numel())
            sel = torch.zeros_like(s, dtype=torch.bool)
            sel[torch.argsort(s, stable=True)[:k]] = True
            removed[:, c1:c2] = sel.view(rows, -1)
        for j in range(c1, c2):
            if n is not None and (j - c1) % m == 0:
                s = W[:, j : j + m] ** 2 / d[j : j + m]
                idx = torch.topk(s, n, dim=1, largest=False).indices
                removed[:, j : j + m].scatter_(1, idx, True)
            Hj = torch.linalg.inv(Fd[j:, j:])
            err = W[:, j] * removed[:, j] / Hj[0, 0]
            W[:, j:] -= err[:, None] * Hj[0][None, :]
            W[removed[:, j], j] = 0.0
    return W, ~removed


def test_shared_fisher_matches_loop_with_padding():
    g = torch.randn(3, 10, generator=torch.Generator().manual_seed(0), dtype=f64)
    F = accumulate_shared_fisher(g[:2], 4)
    F = accumulate_shared_fisher(g[2:], 4, out=F)
    expect = torch.zeros(4, 4, dtype=f64)
    for row in g:
        Gn = torch.cat([row, torch.zeros(2, dtype=f64)]).view(3, 4)
        expect += Gn.T @ Gn
    torch.testing.assert_close(F, expect)
    assert F[2:, 2:].diagonal().tolist() == pytest.approx(expect[2:, 2:].diagonal().tolist())


@pytest.mark.parametrize("block_size", [12, 5, 4])
def test_matches_column_obs_reference(block_size):
    rows, B, num = 7, 12, 40
    X = correlated(num, B, seed=1)
    F = X.T @ X
    W = torch.randn(rows, B, generator=torch.Generator().manual_seed(2), dtype=f64)
    W_new, mask = fast_cap_prune(W, F, num, 0.5, damp=1e-2, block_size=block_size)
    W_ref, mask_ref = column_obs_reference(W, F, num, 0.5, 1e-2, block_size)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(W_new, W_ref, rtol=1e-9, atol=1e-10)
    assert not torch.equal(W_new[mask], W[mask])  # the sweep writes its update back
    for c1 in range(0, B, block_size):  # exactly round(k) per column block
        blk = ~mask[:, c1 : c1 + block_size]
        assert int(blk.sum()) == round(0.5 * blk.numel())
    assert torch.equal(~mask, W_new == 0)


def test_nm_matches_reference_and_is_exact():
    rows, B, num = 6, 16, 30
    X = correlated(num, B, seed=3)
    W = torch.randn(rows, B, generator=torch.Generator().manual_seed(4), dtype=f64)
    W_new, mask = fast_cap_prune(W, X.T @ X, num, 0.0, block_size=8, n=2, m=4)
    W_ref, mask_ref = column_obs_reference(W, X.T @ X, num, 0.0, 1e-2, 8, n=2, m=4)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(W_new, W_ref, rtol=1e-9, atol=1e-10)
    assert torch.all((~mask).view(rows, -1, 4).sum(2) == 2)


def test_nm_with_preexisting_zeros_never_reopens():
    rows, B = 5, 8
    X = correlated(20, B, seed=5)
    W = torch.randn(rows, B, generator=torch.Generator().manual_seed(6), dtype=f64)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    pruned[0, [0, 1]] = True  # a full group
    pruned[1, [4]] = True
    pruned[2, [1, 2, 3]] = True  # more than n: kept pruned
    W_new, mask = fast_cap_prune(W, X.T @ X, 20, 0.0, n=2, m=4, pruned=pruned)
    per_group = (~mask).view(rows, -1, 4).sum(2)
    assert torch.all(~mask[pruned])
    assert per_group[2, 0] == 3 and torch.all(per_group.flatten()[per_group.flatten() != 3] == 2)
    assert torch.all(W_new[~mask] == 0)


def test_beats_magnitude_on_layer_reconstruction():
    d_out, d_in, num = 16, 24, 200
    X = correlated(num, d_in, seed=7, corr=2.0)  # layer inputs with correlated features
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(8), dtype=f64)
    W_new, mask = fast_cap_prune(W, X.T @ X, num, 0.6, damp=1e-4, block_size=8)
    mag = W.clone()
    mag.view(-1)[W.abs().flatten().argsort()[: int((~mask).sum())]] = 0
    err_fast = ((W - W_new) @ X.T).norm()
    err_mag = ((W - mag) @ X.T).norm()
    assert int((~mask).sum()) == 3 * round(0.6 * d_out * 8)  # rounded per column block
    assert err_fast < 0.7 * err_mag


def test_padding_is_excluded_and_zero():
    rows, B, d = 4, 8, 29  # 3 padded coordinates in the last row
    g = torch.randn(10, d, generator=torch.Generator().manual_seed(9), dtype=f64)
    F = accumulate_shared_fisher(g, B)
    w = torch.randn(d, generator=torch.Generator().manual_seed(10), dtype=f64)
    W = torch.cat([w, torch.zeros(rows * B - d, dtype=f64)]).view(rows, B)
    valid = (torch.arange(rows * B) < d).view(rows, B)
    W_new, mask = fast_cap_prune(W, F, 10, 0.5, block_size=4, valid=valid)
    assert torch.all(mask[~valid]) and torch.all(W_new[~valid] == 0)
    for c1 in (0, 4):
        v = valid[:, c1 : c1 + 4]
        assert int((~mask[:, c1 : c1 + 4] & v).sum()) == round(0.5 * int(v.sum()))
    assert torch.equal(~mask & valid, (W_new == 0) & valid)


def test_dead_coordinates_and_monotone_unstructured():
    rows, B = 6, 8
    X = correlated(30, B, seed=11)
    X[:, 3] = 0  # a dead input: zero Fisher row and column
    W = torch.randn(rows, B, generator=torch.Generator().manual_seed(12), dtype=f64)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    pruned[:, 0] = True  # 6 forced zeros in the first column block, more than round(0.25*24)
    W_new, mask = fast_cap_prune(W, X.T @ X, 30, 0.25, block_size=4, pruned=pruned)
    assert torch.isfinite(W_new).all() and torch.all(~mask[:, 0])
    assert int((~mask[:, :4]).sum()) == 6 and int((~mask[:, 4:]).sum()) == 6
    W_dead, mask_dead = fast_cap_prune(W, X.T @ X, 30, 0.25, block_size=4, zero_dead=True)
    assert torch.all(W_dead[:, 3] == 0) and torch.all(~mask_dead[:, 3])


def test_bad_inputs_raise():
    W = torch.randn(2, 8, dtype=f64)
    F = torch.eye(8, dtype=f64)
    with pytest.raises(ValueError, match="F must be"):
        fast_cap_prune(W, F[:4, :4], 1, 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        fast_cap_prune(W, F, 1, 1.5)
    with pytest.raises(ValueError, match="N:M"):
        fast_cap_prune(W, F, 1, 0.5, n=2, m=3)


def test_row_energy_and_scales_match_loops():
    g = torch.randn(3, 10, generator=torch.Generator().manual_seed(5), dtype=f64)
    energy = torch.zeros(3, dtype=f64)
    accumulate_shared_fisher(g[:1], 4, row_energy=energy)
    accumulate_shared_fisher(g[1:], 4, row_energy=energy)
    padded = torch.cat([g, torch.zeros(3, 2, dtype=f64)], 1).view(3, 3, 4)
    expect = torch.tensor([float((padded[:, r] ** 2).sum()) for r in range(3)], dtype=f64)
    torch.testing.assert_close(energy, expect)
    scales = row_scales(energy)
    torch.testing.assert_close(scales, expect / expect.mean())
    assert torch.equal(row_scales(torch.zeros(4, dtype=f64)), torch.ones(4, dtype=f64))
    with pytest.raises(NumericalError, match="row energies"):
        row_scales(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="row_energy must have shape"):
        accumulate_shared_fisher(g, 4, row_energy=torch.zeros(2, dtype=f64))


def test_row_scale_weights_the_selection_not_the_updates():
    rows, B, num = 7, 12, 40
    X = correlated(num, B, seed=6)
    F = X.T @ X
    W = torch.randn(rows, B, generator=torch.Generator().manual_seed(7), dtype=f64)
    scale = torch.linspace(0.1, 3.0, rows, dtype=f64)
    W_new, mask = fast_cap_prune(W, F, num, 0.5, damp=1e-2, block_size=5, row_scale=scale)
    W_ref, mask_ref = column_obs_reference(W, F, num, 0.5, 1e-2, 5, row_scale=scale)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(W_new, W_ref, rtol=1e-9, atol=1e-10)
    plain, plain_mask = fast_cap_prune(W, F, num, 0.5, damp=1e-2, block_size=5)
    assert not torch.equal(mask, plain_mask)  # heavy rows keep more weights
    assert int(mask[-1].sum()) > int(plain_mask[-1].sum())
    # scores: per-row units (F sums the rows), times the row's scale
    scores = fast_cap_scores(W, F, num, 1e-2, scale)
    Fd = F / num + 1e-2 * (F / num).diagonal().mean() * torch.eye(B, dtype=f64)
    d = torch.tensor([torch.linalg.inv(Fd[j:, j:])[0, 0] for j in range(B)], dtype=f64)
    torch.testing.assert_close(scores, W**2 / d / rows * scale[:, None])
    with pytest.raises(ValueError, match="row_scale must have shape"):
        fast_cap_prune(W, F, num, 0.5, row_scale=scale[:3])


@pytest.mark.parametrize("n,m", [(12, 24), (6, 12), (2, 6), (1, 4)])
def test_nm_groups_across_lazy_runs_match_reference(n, m):
    """N:M groups whose columns straddle a lazy-update run: the picks must read every column
    of the group up to date (the column-by-column oracle)."""
    B = 48
    g = torch.Generator().manual_seed(0)
    G = torch.randn(30, 4 * B, generator=g, dtype=f64)
    F = accumulate_shared_fisher(G, B)
    W = torch.randn(4, B, generator=g, dtype=f64)
    got, keep = fast_cap_prune(W, F, 30, 0.0, n=n, m=m, block_size=B)
    want, want_keep = column_obs_reference(W, F, 30, 0.0, 1e-2, B, n=n, m=m)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want)
