"""Oracle tests of FastCAP's loss curves and the allocation built on them
(`fast_cap_losses`, `loss_curve_targets`, ``global_allocation: losses``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparseml.kernels.fast_cap import (
    accumulate_shared_fisher,
    fast_cap_losses,
    fast_cap_prune,
    row_scales,
)
from sparseml.pruning.selectors import loss_curve_targets

f64 = torch.float64


def problem(rows=12, B=16, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(m, rows * B, generator=g, dtype=f64)
    grads += torch.randn(m, 1, generator=g, dtype=f64) * torch.linspace(0.5, 2, rows * B)
    energy = torch.zeros(rows, dtype=f64)
    F = accumulate_shared_fisher(grads, B, row_energy=energy)
    W = torch.randn(rows, B, generator=g, dtype=f64)
    return W, F, m, row_scales(energy)


def quadratic_loss(W, W_new, F, m, damp, scale):
    """1/2 sum_r s_r / rows dW_r^T (F/m + damp * mean(diag F/m) I) dW_r: brute force."""
    Fd = F / m
    Fd = Fd + damp * Fd.diagonal().mean() * torch.eye(F.shape[0], dtype=f64)
    d = W_new - W
    per_row = torch.einsum("rb,bc,rc->r", d, Fd, d) / 2
    s = torch.ones(W.shape[0], dtype=f64) if scale is None else scale
    return float((s * per_row).sum() / W.shape[0])


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("scaled", [False, True])
def test_curve_is_the_quadratic_loss_of_each_sweep(block_size, scaled):
    W, F, m, scale = problem()
    scale = scale if scaled else None
    levels = [0.0, 0.3, 0.5, 0.8, 0.95]
    removed, loss = fast_cap_losses(W, F, m, levels, damp=0.05, block_size=block_size,
                                    row_scale=scale)  # fmt: skip
    for k, level in enumerate(levels):
        W_new, keep = fast_cap_prune(W, F, m, level, damp=0.05, block_size=block_size,
                                     row_scale=scale)  # fmt: skip
        assert removed[k] == int((~keep).sum())
        assert loss[k] == pytest.approx(quadratic_loss(W, W_new, F, m, 0.05, scale), rel=1e-9)
    assert loss[0] == 0 and bool((loss.diff() > 0).all())


def test_already_pruned_entries_count_and_cost_nothing():
    W, F, m, _ = problem()
    pruned = torch.zeros_like(W, dtype=torch.bool)
    pruned[:, :3] = True
    W = W.masked_fill(pruned, 0.0)
    removed, loss = fast_cap_losses(W, F, m, [0.0, 0.5], block_size=16, pruned=pruned)
    assert removed.tolist() == [36.0, 96.0] and loss[0] == 0.0
    W_new, keep = fast_cap_prune(W, F, m, 0.5, block_size=16, pruned=pruned)
    assert loss[1] == pytest.approx(quadratic_loss(W, W_new, F, m, 1e-2, None), rel=1e-9)


def test_row_subset_scales_up_to_an_estimate_of_the_whole_curve():
    W, F, m, scale = problem(rows=200, B=8, seed=1)
    levels = [0.5, 0.9]
    full = fast_cap_losses(W, F, m, levels, block_size=8, row_scale=scale)
    part = fast_cap_losses(W, F, m, levels, block_size=8, row_scale=scale, max_rows=100)
    assert part[0].tolist() == pytest.approx(full[0].tolist(), rel=0.02)  # counts
    assert part[1].tolist() == pytest.approx(full[1].tolist(), rel=0.25)  # sampled losses
    assert part[1].tolist() != full[1].tolist()
    same = fast_cap_losses(W, F, m, levels, block_size=8, row_scale=scale, max_rows=200)
    assert same[1].tolist() == full[1].tolist()  # no more rows than asked: no subset


def test_bad_curve_arguments_raise():
    W, F, m, _ = problem()
    with pytest.raises(ValueError, match="levels"):
        fast_cap_losses(W, F, m, [0.5, 1.5])
    with pytest.raises(ValueError, match="max_rows"):
        fast_cap_losses(W, F, m, [0.5], max_rows=0)
    with pytest.raises(ValueError, match="row_scale"):
        fast_cap_losses(W, F, m, [0.5], row_scale=torch.ones(3, dtype=f64))


def brute_force(curves, sizes, total, step):
    """The least summed (interpolated) loss over every allocation on a grid of ``step``."""

    def at(curve, x):  # piecewise linear through the measured points
        xs, ys = curve
        for (x1, y1), (x2, y2) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x1 <= x <= x2:
                return y1 + (y2 - y1) * (x - x1) / (x2 - x1)
        return None

    best = None
    grids = [[c[0][0] + k * step for k in range(int((c[0][-1] - c[0][0]) / step) + 1)]
             for c in curves]  # fmt: skip
    for xs in itertools.product(*grids):
        if abs(sum(xs) - total) > 1e-9:
            continue
        loss = sum(at(c, x) for c, x in zip(curves, xs))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, xs)
    return best


def test_allocation_is_the_optimum_of_convex_curves():
    # layer 0 is cheap to prune, layer 1 dear, layer 2 in between; all convex
    curves = [
        ([0, 2, 4, 6, 8], [0.0, 1.0, 3.0, 7.0, 15.0]),
        ([0, 2, 4, 6, 8], [0.0, 4.0, 10.0, 20.0, 40.0]),
        ([0, 2, 4, 6, 8], [0.0, 2.0, 5.0, 9.0, 14.0]),
    ]
    sizes = [10, 10, 10]
    for total in (6, 10, 14):
        targets = loss_curve_targets(curves, sizes, total)
        xs = [t * n for t, n in zip(targets, sizes)]
        assert sum(xs) == pytest.approx(total)
        loss, _ = brute_force(curves, sizes, total, 1)
        got = sum(
            torch.tensor(c[1], dtype=f64)[int(x) // 2].item()
            if x % 2 == 0
            else (c[1][int(x) // 2] + c[1][int(x) // 2 + 1]) / 2
            for c, x in zip(curves, xs)
        )
        assert got == pytest.approx(loss)


def test_allocation_convexifies_starts_from_the_least_and_stops_at_the_most():
    # a concave bump (the point at 4 lies above the chord): the hull skips it
    curves = [([1, 4, 8], [0.0, 9.0, 10.0]), ([0, 8], [0.0, 8.0])]
    targets = loss_curve_targets(curves, [8, 8], 10)
    # layer 0 starts at 1 (its least); its hull has slope 10/7 from 1 to 8, layer 1's slope 1
    # is taken first (8 entries), then 1 more entry of layer 0
    assert targets == pytest.approx([2 / 8, 1.0])
    assert loss_curve_targets(curves, [8, 8], 0) == pytest.approx([1 / 8, 0.0])  # its floor
    assert loss_curve_targets(curves, [8, 8], 100) == pytest.approx([1.0, 1.0])  # capped
    with pytest.raises(ValueError, match="one curve per layer"):
        loss_curve_targets(curves, [8], 4)


def test_curve_counts_zero_dead_coordinates_as_the_prune_does():
    W, F, m, _ = problem()
    F[3, :] = 0.0
    F[:, 3] = 0.0  # coordinate 3 is dead: zero_dead zeroes its weights before the sweep
    W_start = W.clone()
    W_start[:, 3] = 0.0
    removed, loss = fast_cap_losses(W, F, m, [0.25, 0.6], block_size=16, zero_dead=True)
    for k, level in enumerate([0.25, 0.6]):
        W_new, keep = fast_cap_prune(W, F, m, level, block_size=16, zero_dead=True)
        assert removed[k] == int((~keep).sum())
        want = quadratic_loss(W_start, W_new, F, m, 1e-2, None)
        assert loss[k] == pytest.approx(want, rel=1e-9)


def test_bad_levels_and_non_finite_inputs_raise():
    from sparseml.errors import NumericalError

    W, F, m, scale = problem()
    for levels in ([], [-0.1], [0.5, "x"]):
        with pytest.raises(ValueError, match="levels"):
            fast_cap_losses(W, F, m, levels)
    with pytest.raises(ValueError, match="max_rows"):
        fast_cap_losses(W, F, m, [0.5], max_rows=2.5)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        fast_cap_losses(bad, F, m, [1.0])  # every copy zeroes the weight: still reported
    scale[0] = float("inf")
    with pytest.raises(NumericalError, match="row scales"):
        fast_cap_losses(W, F, m, [0.5], row_scale=scale)


def test_bad_curves_raise():
    from sparseml.errors import NumericalError

    with pytest.raises(ValueError, match="curve 0"):
        loss_curve_targets([([], [])], [2], 1)
    with pytest.raises(ValueError, match="curve 1"):
        loss_curve_targets([([0, 1], [0, 1]), ([0, 1, 2], [0, 1])], [2, 2], 1)
    with pytest.raises(NumericalError, match="curve 0"):
        loss_curve_targets([([0, 1], [0, float("nan")]), ([0, 2], [0, 1])], [2, 2], 1)


def test_counts_of_a_row_subset_never_exceed_the_valid_entries():
    W, F, m, _ = problem(rows=200, B=8, seed=2)
    valid = torch.ones_like(W, dtype=torch.bool)
    valid[-1, 3:] = False  # the last row is padding from column 3 on
    removed, _ = fast_cap_losses(W, F, m, [1.0], block_size=8, valid=valid, max_rows=50)
    assert removed[0] <= int(valid.sum())
