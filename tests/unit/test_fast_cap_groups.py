"""FastCAP with one Fisher per group of output rows (``fisher_rows``) against brute force.

The conv (3 output channels, rows of 8) and the Linear (5 features, rows of 12) of
``test_fast_cap_rows``: with ``fisher_rows: 2`` the conv has groups of channels {0, 1}, {2}
and the Linear {0, 1}, {2, 3}, {4} (a shorter last group). Each group's Fisher is built here
sample by sample from its own rows only, each group is swept by the column-OBS oracle with its
own Fisher and its rows' scales (their energies over the group's mean), and the global
allocation is one threshold over the groups' per-row scores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseml.errors import RecipeError
from sparseml.kernels.fast_cap import (
    accumulate_shared_fisher,
    fast_cap_losses,
    fast_cap_prune,
    fast_cap_scores,
    group_count,
)
from sparseml.pytorch.optim import ScheduledModifierManager
from test_fast_cap_rows import RECIPE, M, builder, net, prune, weights
from test_kernel_fast_cap import column_obs_reference

f64 = torch.float64
OUT_ROWS = [3, 5]


def brute_group_fishers(blocks: list[int], k: int) -> list[list[tuple[slice, torch.Tensor]]]:
    """Per layer, per group of k output rows: (its rows of B, its Fisher), and per layer the
    energy of every row of B."""
    model, batches = net(), builder()
    layers = []
    for out, b in zip(OUT_ROWS, blocks):
        per_out = weights(model)[len(layers)].numel() // out // b  # rows of B per output row
        layers.append(
            [
                [
                    slice(g * k * per_out, min((g + 1) * k, out) * per_out),
                    torch.zeros(b, b, dtype=f64),
                ]
                for g in range(-(-out // k))
            ]
        )
    energies = [torch.zeros(w.numel() // b, dtype=f64) for w, b in zip(weights(model), blocks)]
    model.eval()
    for _ in range(M):
        args, _, target = next(batches)
        model.zero_grad()
        F.mse_loss(model(*args), target).backward()
        params = (model[0].weight, model[3].weight)
        for p, groups, e, b in zip(params, layers, energies, blocks):
            rows = p.grad.double().reshape(-1, b)
            for r, row in enumerate(rows):
                e[r] += float(row @ row)
                for s, f in groups:  # the row's own group only
                    if s.start <= r < s.stop:
                        f += torch.outer(row, row)
    return layers, energies


def group_oracle(blocks: list[int], k: int, sparsity: float, glob: bool):
    layers, energies = brute_group_fishers(blocks, k)
    dense = [w.double().reshape(-1, b) for w, b in zip(weights(net()), blocks)]
    targets = [sparsity] * 2
    if glob:
        scores = []
        for W, groups, e, b in zip(dense, layers, energies, blocks):
            layer = []
            for s, f in groups:
                Fd = f / M + 0.01 * (f / M).diagonal().mean() * torch.eye(b, dtype=f64)
                d = torch.tensor([torch.linalg.inv(Fd[j:, j:])[0, 0] for j in range(b)])
                scale = e[s] / e[s].mean()
                layer.append((W[s] ** 2 / d / W[s].shape[0] * scale[:, None]).flatten())
            scores.append(torch.cat(layer))
        flat = torch.cat(scores)
        order = torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]
        pruned = torch.zeros(flat.numel(), dtype=torch.bool)
        pruned[order] = True
        targets = [float(p.sum()) / p.numel() for p in pruned.split([s.numel() for s in scores])]
    out = []
    for W, groups, e, b, t in zip(dense, layers, energies, blocks, targets):
        new, keep = W.clone(), torch.ones_like(W, dtype=torch.bool)
        for s, f in groups:
            new[s], keep[s] = column_obs_reference(
                W[s], f, M, t, 1e-2, b, row_scale=e[s] / e[s].mean()
            )
        out.append((new, keep))
    return out


ROWS2 = "    fisher_layout: rows\n    row_scaling: true\n    fisher_rows: 2\n"


@pytest.mark.parametrize(
    "cap,blocks,glob", [(64, [8, 12], False), (64, [8, 12], True), (6, [4, 6], False)]
)
def test_groups_of_rows_match_brute_force_oracle(cap, blocks, glob):
    model = prune(0.5, cap, glob, ROWS2)
    for got, (want, keep) in zip(weights(model), group_oracle(blocks, 2, 0.5, glob)):
        assert torch.equal(got.reshape(-1) != 0, keep.flatten())
        torch.testing.assert_close(got.double().reshape(-1), want.flatten(), rtol=1e-5, atol=1e-6)
    shared = prune(0.5, cap, glob, "    fisher_layout: rows\n    row_scaling: true\n")
    assert not all(torch.equal(a != 0, b != 0) for a, b in zip(weights(model), weights(shared)))


def test_one_group_of_all_rows_is_the_shared_fisher_bit_for_bit():
    base = "    fisher_layout: rows\n    row_scaling: true\n"
    shared = prune(0.5, 64, True, base)
    grouped = prune(0.5, 64, True, base + "    fisher_rows: 5\n")
    for a, b in zip(weights(shared), weights(grouped)):
        assert torch.equal(a, b)


def test_loss_allocation_shares_the_budget_among_groups():
    extra = ROWS2 + "    global_allocation: losses\n"
    model = prune(0.5, 64, True, extra)
    zeros = sum(int((w == 0).sum()) for w in weights(model))
    assert zeros == pytest.approx(0.5 * sum(w.numel() for w in weights(model)), abs=2)


def test_accumulate_groups_sums_each_groups_rows_with_padding():
    g = torch.randn(3, 22, generator=torch.Generator().manual_seed(1), dtype=f64)
    assert group_count(6, 4) == 2 and group_count(6, None) == 1
    out = accumulate_shared_fisher(g[:1], 4, group_rows=4)
    out = accumulate_shared_fisher(g[1:], 4, out=out, group_rows=4)
    want = torch.zeros(2, 4, 4, dtype=f64)
    for row in g:
        Gn = torch.cat([row, torch.zeros(2, dtype=f64)]).view(6, 4)
        for r in range(6):
            want[r // 4] += torch.outer(Gn[r], Gn[r])
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="out must have shape"):
        accumulate_shared_fisher(g, 4, out=torch.zeros(4, 4, dtype=f64), group_rows=4)


def test_fisher_rows_needs_the_rows_layout_and_a_positive_count():
    with pytest.raises(RecipeError, match="fisher_rows.*fisher_layout: rows"):
        prune(0.5, 8, False, "    fisher_rows: 2\n")
    with pytest.raises(RecipeError, match="fisher_rows"):
        prune(0.5, 8, False, "    fisher_layout: rows\n    fisher_rows: 0\n")


def grouped_problem(G=3, R=4, B=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(G * R, B, generator=gen, dtype=f64)
    grads = torch.randn(G, 16, R * B, generator=gen, dtype=f64)
    F = torch.stack([accumulate_shared_fisher(g, B) for g in grads])
    scale = torch.rand(G * R, generator=gen, dtype=f64) + 0.5
    return W, F, scale


@pytest.mark.parametrize("nm", [False, True])
def test_grouped_sweep_is_each_group_swept_with_its_own_fisher(nm):
    """One grouped call equals G calls with the shared-Fisher kernel, one per group."""
    W, F, scale = grouped_problem()
    F[1, :, 2] = F[1, 2, :] = 0.0  # a dead coordinate in one group only
    kw = {"n": 2, "m": 4} if nm else {}
    targets = [0.5, 0.25, 0.75]
    got_W, got_keep = fast_cap_prune(
        W, F, 16, targets, block_size=4, row_scale=scale, zero_dead=True, **kw
    )
    for g in range(3):
        s = slice(4 * g, 4 * g + 4)
        want_W, want_keep = fast_cap_prune(
            W[s], F[g], 16, targets[g], block_size=4, row_scale=scale[s], zero_dead=True, **kw
        )
        assert torch.equal(got_keep[s], want_keep)
        torch.testing.assert_close(got_W[s], want_W, rtol=1e-10, atol=1e-12)


def test_grouped_loss_curves_are_the_groups_own_curves():
    W, F, scale = grouped_problem()
    levels = [0.25, 0.5, 0.9]
    removed, loss = fast_cap_losses(W, F, 16, levels, block_size=4, row_scale=scale)
    assert removed.shape == loss.shape == (3, 3)
    for g in range(3):
        s = slice(4 * g, 4 * g + 4)
        r, l = fast_cap_losses(W[s], F[g], 16, levels, block_size=4, row_scale=scale[s])
        torch.testing.assert_close(removed[:, g], r)
        torch.testing.assert_close(loss[:, g], l, rtol=1e-10, atol=1e-14)
    # measured on 2 of each group's 4 rows: counts scaled up to the whole group, same sign
    r2, l2 = fast_cap_losses(W, F, 16, levels, block_size=4, row_scale=scale, max_rows=6)
    assert r2.shape == (3, 3) and bool((r2 <= 32).all()) and bool((l2 >= 0).all())
    torch.testing.assert_close(r2[:, 0], removed[:, 0], rtol=0.3, atol=2.0)


def test_memory_plan_counts_one_fisher_per_group():
    """The preflight's Fisher items are G x B x B float64 per layer: conv 2 groups of B = 8,
    Linear 3 groups of B = 12 with fisher_rows: 2."""
    text = RECIPE.format(s=0.5, m=M, cap=64, glob="false", extra=ROWS2)
    manager = ScheduledModifierManager.from_yaml(text)
    manager.apply(net(), grad_sampler={"data_loader_builder": builder, "loss_fn": F.mse_loss})
    (mod,) = manager.modifiers
    plan, _ = mod.estimator().memory(mod, mod.fisher_block_size, M)
    fishers = [i.nbytes for i in plan if i.what.startswith("Fisher")]
    assert fishers == [2 * 8 * 8 * 8, 3 * 12 * 12 * 8]


def test_a_short_last_group_is_measured_on_its_own_live_rows():
    """The last group (rows 8-11) has 2 live rows, 10 and 11; measuring 2 rows per group must
    take those two, not its padding rows (the fixed random order puts 8 and 9 first), so its
    curve is never empty."""
    W, F, scale = grouped_problem()
    valid = torch.ones_like(W, dtype=torch.bool)
    valid[8:10] = False
    W[8:10] = 0.0
    levels = [0.25, 0.5, 0.9]
    removed, loss = fast_cap_losses(W, F, 16, levels, block_size=4, valid=valid, max_rows=6)
    full, full_loss = fast_cap_losses(W, F, 16, levels, block_size=4, valid=valid)
    assert bool((removed[:, 2] > 0).all()) and bool((loss[:, 2] > 0).all())
    torch.testing.assert_close(removed[:, 2], full[:, 2])  # both live rows measured: exact
    torch.testing.assert_close(loss[:, 2], full_loss[:, 2])


def test_one_group_noncontiguous_valid_and_bad_inputs():
    W, F, scale = grouped_problem()
    one = accumulate_shared_fisher(torch.randn(16, 12 * 8, dtype=f64), 8, group_rows=12)
    assert one.shape == (1, 8, 8)
    shared = fast_cap_prune(W, one[0], 16, 0.5, block_size=4, row_scale=scale)
    grouped = fast_cap_prune(W, one, 16, [0.5], block_size=4, row_scale=scale)
    assert all(torch.equal(a, b) for a, b in zip(shared, grouped))
    r1, l1 = fast_cap_losses(W, one, 16, [0.5], block_size=4)
    r0, l0 = fast_cap_losses(W, one[0], 16, [0.5], block_size=4)
    assert torch.equal(r1, r0) and torch.equal(l1, l0)
    valid = torch.ones(8, 12, dtype=torch.bool).T  # a transposed, non-contiguous view
    got = fast_cap_losses(W, F, 16, [0.5], block_size=4, valid=valid)
    want = fast_cap_losses(W, F, 16, [0.5], block_size=4, valid=valid.contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="one sparsity per group"):
        fast_cap_prune(W, F, 16, [0.5, 0.5], block_size=4)
    with pytest.raises(ValueError, match="one sparsity per group"):
        fast_cap_prune(W, F, 16, [0.5], block_size=4, n=2, m=4)
    with pytest.raises(ValueError, match="row_scale must have shape"):
        fast_cap_scores(W, F, 16, row_scale=torch.ones(1, dtype=f64))
