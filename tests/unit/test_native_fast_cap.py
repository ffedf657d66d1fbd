"""FastCAP's compiled sweep steps (`sparseml.kernels.native_fast_cap`) against the torch steps
they replace, and the factors of a grouped Fisher against one group at a time."""

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
def compiled_calls(monkeypatch):
    """How often the compiled loop ran (so a comparison cannot be torch against torch)."""
    calls, loop = [], native_fast_cap._sweep_run

    def counted(*args):
        calls.append(1)
        return loop(*args)

    monkeypatch.setattr(native_fast_cap, "_sweep_run", counted)
    return calls


@pytest.fixture
def torch_steps(monkeypatch):
    """Run the sweeps with the torch steps (what accelerators, N:M and SPARSEML_NATIVE=0 use):
    the switch every compiled kernel reads at each call."""

    def off() -> None:
        monkeypatch.setattr(native, "ENABLED", False)
        assert not native_fast_cap.usable(torch.zeros(1, 8, dtype=D), None, 8)

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
def test_prune_equals_the_torch_sweep(G, block_size, torch_steps, compiled_calls):
    """Whole prunes (several lazy runs and column blocks, 3 sweeps, row scales, padding,
    pruned entries): the same masks and the same weights to rounding."""
    B, rows = 40, 16
    F = _fisher(G, B)
    W, valid, pruned, scale = _layer(rows, B)
    kw = dict(
        damp=1e-3, block_size=block_size, valid=valid, pruned=pruned, row_scale=scale, sweeps=3
    )
    W_c, keep_c = fast_cap_prune(W.double(), F, 16, 0.7, **kw)
    assert compiled_calls
    torch_steps()
    W_t, keep_t = fast_cap_prune(W.double(), F, 16, 0.7, **kw)
    assert torch.equal(keep_c, keep_t)
    torch.testing.assert_close(W_c, W_t, rtol=1e-10, atol=1e-12)


def test_loss_curves_equal_the_torch_sweep(torch_steps, compiled_calls):
    """Several copies of the rows at once (one per sparsity) take the compiled steps too."""
    B, rows = 24, 20
    F = _fisher(2, B)
    W, valid, pruned, scale = _layer(rows, B)
    kw = dict(damp=1e-2, block_size=B, valid=valid, pruned=pruned, row_scale=scale)
    removed_c, loss_c = fast_cap_losses(W, F, 16, [0.3, 0.6, 0.9], **kw)
    assert compiled_calls
    torch_steps()
    removed_t, loss_t = fast_cap_losses(W, F, 16, [0.3, 0.6, 0.9], **kw)
    assert torch.equal(removed_c, removed_t)
    torch.testing.assert_close(loss_c, loss_t, rtol=1e-10, atol=0.0)


def test_nm_float32_and_short_runs_keep_the_torch_steps():
    WT, R = torch.zeros(4, 8, dtype=D), native_fast_cap.MIN_RUN
    assert native_fast_cap.usable(WT, None, R)
    assert not native_fast_cap.usable(WT, 2, R)  # N:M picks inside a run
    assert not native_fast_cap.usable(WT.float(), None, R)
    assert not native_fast_cap.usable(WT, None, R - 1)  # runs of few rows: torch is faster


def _run_args():
    return (
        torch.zeros(6, 8, dtype=D), torch.zeros(4, 8, dtype=D), torch.eye(6, dtype=D)[None],
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, text",
    [
        (lambda a: (a[0], a[1][:2], a[2], 0, 0, 4, 8), "outside"),  # E1 has 2 rows, r2 = 4
        (lambda a: (*a, 4, 0, 4, 8), "outside"),  # c1 + r2 beyond B
        (lambda a: (a[0], a[1], torch.eye(2, dtype=D)[None], 0, 0, 2, 8), "do not fit"),
        (lambda a: (*a, 0, 0, 2, 0), "multiple of R"),
        (lambda a: (a[0], a[1], torch.eye(6, dtype=D).expand(3, 6, 6), 0, 0, 2, 4), "times G"),
        (lambda a: (a[0].float(), *a[1:], 0, 0, 2, 8), "float64"),
        (lambda a: (a[0].T.contiguous().T, *a[1:], 0, 0, 2, 8), "C-contiguous"),
    ],
)
def test_sweep_run_checks_every_shape_before_the_unchecked_loop(change, text):
    """The compiled loop checks no bounds: a call that would read or write past an array
    is an error before it starts, and nothing is written."""
    args = change(_run_args())
    before = [a.clone() for a in args[:3]]
    with pytest.raises(ValueError, match=text):
        native_fast_cap.sweep_run(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[:3], before))


def test_inputs_that_require_grad_are_swept_as_by_torch(torch_steps, compiled_calls):
    B, rows = 16, 8
    F = _fisher(None, B)
    W, valid, pruned, scale = _layer(rows, B)
    W_c, keep_c = fast_cap_prune(W.double().requires_grad_(), F, 16, 0.5, sweeps=2)
    assert compiled_calls
    torch_steps()
    W_t, keep_t = fast_cap_prune(W.double(), F, 16, 0.5, sweeps=2)
    assert torch.equal(keep_c, keep_t)
    torch.testing.assert_close(W_c.detach(), W_t, rtol=1e-10, atol=1e-12)


def test_grouped_factors_equal_each_groups_own():
    """The factors of a grouped Fisher equal inverse_factor group by group, bit for bit, also
    for a group without curvature (magnitude fallback) and one that needs extra damping."""
    B = 6
    F = _fisher(4, B)
    F[1] = 0.0  # no curvature: identity fallback
    F[2] = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1e-3], dtype=D))  # indefinite
    U = factors(F, 4, 0.0)
    for g in range(4):
        assert torch.equal(U[g], inverse_factor(F[g], 4, 0.0))
    F[3, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        factors(F, 4, 0.0)
