"""FastCAP's compiled sweep steps (`sparseml.kernels.native_fast_cap`) against the torch steps
they replace, and the batched factors of a grouped Fisher against one group at a time."""

from __future__ import annotations

import pytest
import torch

from sparseml.errors import NumericalError
from sparseml.kernels import native, native_fast_cap
from sparseml.kernels.fast_cap import fast_cap_losses, fast_cap_prune
from sparseml.kernels.fast_cap_sweep import Sweep, factors, inverse_factor

pytestmark = pytest.mark.skipif(not native.ENABLED, reason="numba is not installed")

D = torch.float64


@pytest.fixture
def torch_steps(monkeypatch):
    """Run the sweeps with the torch steps (what accelerators and N:M use)."""

    def off() -> None:
        monkeypatch.setattr(native_fast_cap, "usable", lambda WT, n: False)

    return off


def _fisher(G: int | None, B: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (B + 3, B) if G is None else (G, B + 3, B)
    x = torch.randn(shape, generator=g, dtype=D)
    return x.mT @ x


def _layer(rows: int, B: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, B, generator=g)
    valid = torch.ones(rows, B, dtype=torch.bool)
    valid[-1, B // 2 :] = False  # padding at the end of the last row
    pruned = (torch.rand(rows, B, generator=g) < 0.1) & valid
    scale = torch.rand(rows, generator=g, dtype=D) + 0.5
    return W, valid, pruned, scale


@pytest.mark.parametrize("G", [None, 3])
@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("span", [(0, 7), (3, 11), (0, 12)])
def test_one_run_equals_the_torch_steps(G, copies, span):
    """One call of the compiled steps on columns r1 .. r2 - 1 of a block starting at c1 = 2
    equals the per-column torch steps (errors and weights)."""
    B, rows, c1 = 14, 6, 2
    F = _fisher(G, B)
    W, valid, _, _ = _layer(rows, B)
    sweep = Sweep(W, F, 4, 1e-2, B, None, None, valid, None, None)
    WT = torch.randn(B, copies * rows, dtype=D, generator=torch.Generator().manual_seed(2))
    E1 = torch.rand(B - c1, copies * rows, dtype=D, generator=torch.Generator().manual_seed(3))
    E1[E1 < 0.5] = 0.0  # entries not removed carry no error
    WT_t, E1_t = WT.clone(), E1.clone()
    r1, r2 = span
    sweep._steps(WT_t[c1:], c1, r1, r2, None, E1_t, None)
    U3 = sweep.U if sweep.U.dim() == 3 else sweep.U[None]  # column-major for one group
    native_fast_cap.sweep_run(WT, E1, U3, c1, r1, r2, sweep.R)
    torch.testing.assert_close(E1, E1_t, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(WT, WT_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("G", [None, 2])
@pytest.mark.parametrize("block_size", [40, 13])
def test_prune_equals_the_torch_sweep(G, block_size, torch_steps):
    """Whole prunes (several lazy runs and column blocks, 3 sweeps, row scales, padding,
    pruned entries): the same masks and the same weights to rounding."""
    B, rows = 40, 8
    F = _fisher(G, B)
    W, valid, pruned, scale = _layer(rows, B)
    kw = dict(
        damp=1e-3, block_size=block_size, valid=valid, pruned=pruned, row_scale=scale, sweeps=3
    )
    W_c, keep_c = fast_cap_prune(W.double(), F, 16, 0.7, **kw)
    torch_steps()
    W_t, keep_t = fast_cap_prune(W.double(), F, 16, 0.7, **kw)
    assert torch.equal(keep_c, keep_t)
    torch.testing.assert_close(W_c, W_t, rtol=1e-10, atol=1e-12)


def test_loss_curves_equal_the_torch_sweep(torch_steps):
    """Several copies of the rows at once (one per sparsity) take the compiled steps too."""
    B, rows = 24, 10
    F = _fisher(2, B)
    W, valid, pruned, scale = _layer(rows, B)
    kw = dict(damp=1e-2, block_size=B, valid=valid, pruned=pruned, row_scale=scale)
    removed_c, loss_c = fast_cap_losses(W, F, 16, [0.3, 0.6, 0.9], **kw)
    torch_steps()
    removed_t, loss_t = fast_cap_losses(W, F, 16, [0.3, 0.6, 0.9], **kw)
    assert torch.equal(removed_c, removed_t)
    torch.testing.assert_close(loss_c, loss_t, rtol=1e-10, atol=0.0)


def test_nm_and_float32_sweeps_keep_the_torch_steps():
    WT = torch.zeros(4, 4, dtype=D)
    assert native_fast_cap.usable(WT, None)
    assert not native_fast_cap.usable(WT, 2)  # N:M picks inside a run
    assert not native_fast_cap.usable(WT.float(), None)


def test_grouped_factors_equal_each_groups_own():
    """The batched factors of a grouped Fisher equal inverse_factor group by group, also for a
    group without curvature (magnitude fallback) and one that needs the extra damping."""
    B = 6
    F = _fisher(4, B)
    F[1] = 0.0  # no curvature: identity fallback
    F[2] = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1e-3], dtype=D))  # indefinite
    U = factors(F, 4, 0.0)
    for g in range(4):
        torch.testing.assert_close(U[g], inverse_factor(F[g], 4, 0.0), rtol=1e-12, atol=1e-14)
    F[3, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        factors(F, 4, 0.0)
