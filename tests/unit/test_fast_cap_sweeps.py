"""FastCAP reaching its target in several sweeps (``sweeps``) against a brute-force oracle.

The oracle sweeps the columns one by one with the explicit inverse of F[j:, j:] (as
``column_obs_reference``), once per level of rising sparsity; in every column block the entries
an earlier sweep removed are taken first, then the lowest scores of the weights as the earlier
sweeps left them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseml.errors import RecipeError
from sparseml.kernels.fast_cap import fast_cap_prune, sweep_levels
from sparseml.pruning.methods.fast_cap import sweep_bytes
from sparseml.pytorch.optim import ScheduledModifierManager
from test_fast_cap_rows import RECIPE, M, brute_fishers, builder, net, prune, weights
from test_kernel_fast_cap import correlated

f64 = torch.float64


def multi_sweep_oracle(
    W, F, num_grads, levels, damp, block_size, row_scale=None, pruned=None, valid=None
):
    W = W.clone()
    rows, B = W.shape
    valid = torch.ones_like(W, dtype=torch.bool) if valid is None else valid
    Fd = F / num_grads
    Fd = Fd + damp * Fd.diagonal().mean() * torch.eye(B, dtype=f64)
    inverses = [torch.linalg.inv(Fd[j:, j:]) for j in range(B)]
    d = torch.tensor([h[0, 0] for h in inverses], dtype=f64)
    pruned = torch.zeros_like(W, dtype=torch.bool) if pruned is None else pruned & valid
    W[pruned | ~valid] = 0.0
    for level in levels:
        removed = torch.zeros_like(W, dtype=torch.bool)
        for c1 in range(0, B, block_size):
            c2 = min(c1 + block_size, B)
            s = W[:, c1:c2] ** 2 / d[c1:c2]
            s = s if row_scale is None else s * row_scale[:, None]
            s = s.masked_fill(pruned[:, c1:c2], -1.0).masked_fill(~valid[:, c1:c2], float("inf"))
            s = s.flatten()
            k = max(round(level * int(valid[:, c1:c2].sum())), int(pruned[:, c1:c2].sum()))
            sel = torch.zeros_like(s, dtype=torch.bool)
            sel[torch.argsort(s, stable=True)[:k]] = True
            removed[:, c1:c2] = sel.view(rows, -1) & valid[:, c1:c2]
            for j in range(c1, c2):
                gone = removed[:, j] | ~valid[:, j]  # padding is held at zero
                err = W[:, j] * gone / inverses[j][0, 0]
                W[:, j:] -= err[:, None] * inverses[j][0][None, :]
                W[gone, j] = 0.0
        pruned = removed
    return W, ~pruned | ~valid


def problem(rows=9, B=12, seed=0):
    g = correlated(40, B, seed)
    W = torch.randn(rows, B, generator=torch.Generator().manual_seed(seed + 1), dtype=f64)
    return W, g.T @ g


def test_levels_fall_geometrically_in_density_from_where_each_group_stands():
    assert sweep_levels(0.9, 2, (4, 5)) == pytest.approx([1 - 0.1**0.5, 0.9])
    assert sweep_levels(0.75, 1, (4, 5)) == [0.75]
    pruned = torch.zeros(4, 5, dtype=torch.bool)
    pruned[:2] = True  # group 0 (rows 0, 1) is empty, group 1 dense
    levels = sweep_levels([0.5, 0.96], 2, (4, 5), 2, pruned=pruned)
    assert levels[0] == pytest.approx([0.5, 1 - 0.04**0.5]) and levels[1] == [0.5, 0.96]
    half = torch.zeros(4, 5, dtype=torch.bool)
    half[:, :2] = True  # 40% already pruned everywhere: density 0.6 -> 0.1 in 3 sweeps
    got = sweep_levels(0.9, 3, (4, 5), pruned=half)
    assert got == pytest.approx([1 - 0.6 * (0.1 / 0.6) ** (p / 3) for p in (1, 2, 3)])
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[3] = False  # padding does not count: 6 of 15 valid entries are pruned, not 10 of 20
    got = sweep_levels(0.9, 2, (4, 5), valid=valid, pruned=half | ~valid)
    assert got[0] == pytest.approx(1 - 0.6 * (0.1 / 0.6) ** 0.5)
    with pytest.raises(ValueError, match="one sparsity per group"):
        sweep_levels([0.5], 2, (4, 5), 2)


@pytest.mark.parametrize("block_size,sweeps", [(12, 3), (5, 4), (4, 2)])
def test_sweeps_match_the_multi_sweep_oracle(block_size, sweeps):
    W, F = problem()
    scale = torch.linspace(0.5, 2.0, W.shape[0], dtype=f64)
    got, keep = fast_cap_prune(
        W, F, 40, 0.8, damp=1e-2, block_size=block_size, row_scale=scale, sweeps=sweeps
    )
    levels = sweep_levels(0.8, sweeps, W.shape)
    want, want_keep = multi_sweep_oracle(W, F, 40, levels, 1e-2, block_size, row_scale=scale)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    one, _ = fast_cap_prune(W, F, 40, 0.8, damp=1e-2, block_size=block_size, row_scale=scale)
    assert not torch.equal(got != 0, one != 0)  # the later sweeps choose differently


def test_sweeps_start_from_the_pruned_entries_and_keep_them():
    W, F = problem(seed=3)
    pruned = torch.rand(W.shape, generator=torch.Generator().manual_seed(4)) < 0.3
    got, keep = fast_cap_prune(W, F, 40, 0.9, damp=1e-2, block_size=6, pruned=pruned, sweeps=3)
    levels = sweep_levels(0.9, 3, W.shape, pruned=pruned)
    want, want_keep = multi_sweep_oracle(W, F, 40, levels, 1e-2, 6, pruned=pruned)
    assert torch.equal(keep, want_keep) and not bool((keep & pruned).any())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_sweeps_over_padding_count_valid_entries_only():
    """Rows 9-15 and the last 3 columns of row 8 are padding, half of the rest is pruned:
    the levels (worked out here, not by sweep_levels) start from the valid entries' density."""
    W, F = problem(rows=16, seed=7)
    valid = torch.ones_like(W, dtype=torch.bool)
    valid[9:] = False
    valid[8, 9:] = False
    W = W * valid
    pruned = (torch.rand(W.shape, generator=torch.Generator().manual_seed(8)) < 0.5) & valid
    d0 = 1 - float(pruned.sum()) / float(valid.sum())
    levels = [1 - d0 * (0.1 / d0) ** (p / 4) for p in (1, 2, 3, 4)]
    got, keep = fast_cap_prune(
        W, F, 40, 0.9, damp=1e-2, block_size=4, valid=valid, pruned=pruned, sweeps=4
    )
    want, want_keep = multi_sweep_oracle(W, F, 40, levels, 1e-2, 4, pruned=pruned, valid=valid)
    assert torch.equal(keep, want_keep) and bool((got[~valid] == 0).all())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # counting the padding would start from another density and choose otherwise
    d_all = 1 - float((pruned | ~valid).sum()) / W.numel()
    wrong = [1 - d_all * (0.1 / d_all) ** (p / 4) for p in (1, 2, 3, 4)]
    other, _ = multi_sweep_oracle(W, F, 40, wrong, 1e-2, 4, pruned=pruned, valid=valid)
    assert not torch.allclose(other, want)


def test_grouped_sweeps_are_each_group_swept_alone():
    W, F1 = problem(rows=8, seed=5)
    _, F2 = problem(rows=8, seed=6)
    F = torch.stack([F1, F2])
    got, keep = fast_cap_prune(W, F, 40, [0.7, 0.85], damp=1e-2, block_size=12, sweeps=3)
    for g, (rows, target) in enumerate([(slice(0, 4), 0.7), (slice(4, 8), 0.85)]):
        w, k = fast_cap_prune(W[rows], F[g], 40, target, damp=1e-2, block_size=12, sweeps=3)
        torch.testing.assert_close(got[rows], w)
        assert torch.equal(keep[rows], k)


def test_one_sweep_is_the_default_bit_for_bit_and_bad_counts_raise():
    W, F = problem()
    a = fast_cap_prune(W.float(), F, 40, 0.6, block_size=5)
    b = fast_cap_prune(W.float(), F, 40, 0.6, block_size=5, sweeps=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].dtype == torch.float32
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="sweeps must be an int >= 1"):
            fast_cap_prune(W, F, 40, 0.6, sweeps=bad)
    with pytest.raises(ValueError, match="1 with N:M"):
        fast_cap_prune(W, F, 40, 0.5, n=2, m=4, block_size=4, sweeps=2)


def test_modifier_sweeps_match_the_oracle_end_to_end():
    """A conv and a Linear (``test_fast_cap_rows``), each swept 3 times to 75% with its own
    brute-force Fisher."""
    rows = "    fisher_layout: rows\n"
    model = prune(0.75, 64, False, rows + "    sweeps: 3\n")
    fishers, _ = brute_fishers([8, 12])
    dense = [w.double().reshape(-1, b) for w, b in zip(weights(net()), [8, 12])]
    for got, W, f, b in zip(weights(model), dense, fishers, [8, 12]):
        levels = sweep_levels(0.75, 3, W.shape)
        want, keep = multi_sweep_oracle(W, f, M, levels, 1e-2, b)
        assert torch.equal(got.reshape(-1) != 0, keep.flatten())
        torch.testing.assert_close(got.double().reshape(-1), want.flatten(), rtol=1e-5, atol=1e-6)
        assert float((got == 0).double().mean()) == 0.75
    one = prune(0.75, 64, False, rows)
    assert not all(torch.equal(a != 0, b != 0) for a, b in zip(weights(model), weights(one)))


def test_recipe_checks_the_count_and_the_mask_type():
    def load(extra):
        text = RECIPE.format(s=0.5, m=M, cap=64, glob="false", extra=extra)
        return ScheduledModifierManager.from_yaml(text).modifiers[0]

    assert load("").sweeps == 1 and load("    sweeps: 4\n").sweeps == 4
    with pytest.raises(RecipeError, match="sweeps.*unstructured mask_type"):
        load("    sweeps: 2\n    mask_type: '2:4'\n")
    for bad in ("0", "1.5", "many"):
        with pytest.raises(RecipeError, match="sweeps"):
            load(f"    sweeps: {bad}\n")


def test_memory_plan_holds_the_previous_sweeps_weights():
    """One more float64 copy of the largest layer's rows (the Linear: 5 rows of 12)."""
    mods = []
    for extra in ("", "    sweeps: 4\n"):
        text = RECIPE.format(
            s=0.5, m=M, cap=64, glob="false", extra="    fisher_layout: rows\n" + extra
        )
        manager = ScheduledModifierManager.from_yaml(text)
        manager.apply(net(), grad_sampler={"data_loader_builder": builder, "loss_fn": F.mse_loss})
        mods.append(manager.modifiers[0])
    one, four = mods
    assert sweep_bytes(four, four.blocks()) - sweep_bytes(one, one.blocks()) == 8 * 5 * 12


@pytest.mark.parametrize("shape", [(1, 7, 9), (5, 4, 6), (3, 1, 1)])
def test_select_smallest_is_a_stable_sorts_first_k(shape):
    """Against a stable argsort per copy: ties (scores drawn from 4 values), forced (-1) and
    padding (+inf) entries, and counts of 0, all and everything between."""
    from sparseml.kernels.fast_cap_sweep import select_smallest

    gen = torch.Generator().manual_seed(sum(shape))
    scores = torch.randint(0, 4, shape, generator=gen).double()
    scores[..., 0] = -1.0
    scores[..., -1] = float("inf")
    n = scores[0].numel()
    ks = (
        [0] * shape[0],
        [n] * shape[0],
        [min(i * 3 + 1, n) for i in range(shape[0])],  # distinct counts (a sort above 4)
        [max(n // 2, 1)] * shape[0],  # one count shared by every copy
        [max(n // 2, 1) if i % 2 else min(2, n) for i in range(shape[0])],
    )
    for k in ks:
        got = select_smallest(scores, k)
        for copy, count in zip(range(shape[0]), k):
            order = torch.argsort(scores[copy].flatten(), stable=True)[:count]
            want = torch.zeros(n, dtype=torch.bool)
            want[order] = True
            assert torch.equal(got[copy].flatten(), want)
    nan = scores.clone()
    nan.view(shape[0], -1)[:, n // 2] = float("nan")  # sorted last, as a stable sort does
    k = [n - 1] * shape[0]
    got = select_smallest(nan, k)
    for copy in range(shape[0]):
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.argsort(nan[copy].flatten(), stable=True)[: n - 1]] = True
        assert torch.equal(got[copy].flatten(), want)
    with pytest.raises(ValueError, match="one count per copy"):
        select_smallest(scores, k[:-1] if shape[0] > 1 else [])
