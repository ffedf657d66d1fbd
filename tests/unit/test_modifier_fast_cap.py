"""FastCAPruningModifier end to end against a column-by-column OBS oracle on a tiny MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseml.errors import RecipeError
from sparseml.pruning.methods import FastCAPruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager
from test_kernel_fast_cap import column_obs_reference
from toy import builder, mlp, sampler, weights_of

RECIPE = """
pruning_modifiers:
  - !FastCAPruningModifier
    params: {params}
    init_sparsity: {s}
    final_sparsity: {final}
    start_epoch: 0
    end_epoch: 1
    update_frequency: 1
    num_grads: 20
    damp: 0.01
    fisher_block_size: {block}
"""


def recipe(s=0.5, block=8, final=None, params='["re:.*weight"]', extra=""):
    text = RECIPE.format(s=s, final=s if final is None else final, block=block, params=params)
    return text + "".join(f"    {line}\n" for line in extra.splitlines() if line)


def shared_fishers(model, m, block):
    """Per layer: F = sum_n G_n^T G_n with G_n the sample's gradient cut into rows of B."""
    params = [model[0].weight, model[2].weight]
    fishers = [torch.zeros(block, block, dtype=torch.float64) for _ in params]
    batches = builder()()
    model.eval()
    for _ in range(m):
        args, _, target = next(batches)
        model.zero_grad()
        F.mse_loss(model(*args), target).backward()
        for p, f in zip(params, fishers):
            g = p.grad.reshape(-1, block).double()
            f += g.T @ g
    return fishers


def test_one_shot_matches_column_obs_oracle():
    # B = d_in: rows are output rows, the SparseGPT layout.
    fishers = shared_fishers(mlp(), 20, 8)
    model = mlp()
    ScheduledModifierManager.from_yaml(recipe(0.5)).apply(model, grad_sampler=sampler())
    for got, dense, f in zip(weights_of(model), weights_of(mlp()), fishers):
        want, keep = column_obs_reference(dense.double().view(-1, 8), f, 20, 0.5, 1e-2, 8)
        assert torch.equal(got != 0, keep.flatten())
        torch.testing.assert_close(got.double(), want.flatten(), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, dense * keep.flatten())  # written back


def test_padding_and_per_layer_targets():
    # B = 12 does not divide 64 or 32; each layer gets its own target and block_size 4.
    final = '{0.5: ["0.weight"], 0.25: ["2.weight"]}'
    text = recipe(0.0, block=12, final=final, params="[]", extra="block_size: 4")
    model = mlp()
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler())
    for w, s in zip(weights_of(model), (0.5, 0.25)):
        rows = -(-w.numel() // 12)
        padded = torch.cat([w, torch.ones(rows * 12 - w.numel())]).view(rows, 12)
        valid = (torch.arange(rows * 12) < w.numel()).view(rows, 12)
        for c in range(0, 12, 4):
            n_valid = int(valid[:, c : c + 4].sum())
            assert int((padded[:, c : c + 4] == 0).sum()) == round(s * n_valid)


def test_nm_and_recomputed_steps_are_exact_and_monotone():
    model = mlp()
    text = recipe(0.5, extra='mask_type: "2:4"\nblock_size: 4')
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler())
    for w in weights_of(model):
        assert torch.equal((w.view(-1, 4) == 0).sum(1), torch.full((w.numel() // 4,), 2))
    model, counter = mlp(), []
    text = recipe(0.75, extra="num_recomputations: 2")
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler(counter))
    assert len(counter) == 2 * 20
    assert [int((w == 0).sum()) for w in weights_of(model)] == [48, 24]


def test_global_sparsity_shares_one_budget_among_layers():
    """Per-layer targets from one threshold over w^2 / [(F[j:, j:])^-1]_00 / rows of both
    layers (F sums a layer's rows: per-row units), then each layer swept to its own target
    (the column-OBS oracle)."""
    fishers = shared_fishers(mlp(), 20, 8)
    dense = [w.double().view(-1, 8) for w in weights_of(mlp())]
    scores = []
    for W, f in zip(dense, fishers):
        Fd = f / 20 + 0.01 * (f / 20).diagonal().mean() * torch.eye(8, dtype=torch.float64)
        d = torch.tensor([torch.linalg.inv(Fd[j:, j:])[0, 0] for j in range(8)])
        scores.append((W**2 / d / W.shape[0]).flatten())
    flat = torch.cat(scores)
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.argsort(flat, stable=True)[: round(0.5 * flat.numel())]] = True
    counts = [int(p.sum()) for p in pruned.split([s.numel() for s in scores])]
    targets = [c / s.numel() for c, s in zip(counts, scores)]
    assert targets[0] != targets[1]  # the budget is really shared unevenly

    model = mlp()
    text = recipe(0.5, extra="global_sparsity: true")
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler())
    for got, W, f, t in zip(weights_of(model), dense, fishers, targets):
        want, keep = column_obs_reference(W, f, 20, t, 1e-2, 8)
        assert torch.equal(got != 0, keep.flatten())
        torch.testing.assert_close(got.double(), want.flatten(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask_type": "block4", "fisher_block_size": 8}, "mask_type"),
        ({"mask_type": "2:4", "fisher_block_size": 8, "block_size": 6}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"zero_dead": "yes"}, "zero_dead"),
        ({"row_scaling": "yes"}, "row_scaling.*true or false"),
        ({"global_allocation": "threshold"}, "global_allocation.*scores.*losses"),
        ({"global_allocation": "losses"}, "global_allocation.*global_sparsity: true"),
        (
            {
                "global_allocation": "losses",
                "global_sparsity": True,
                "mask_type": "2:4",
                "fisher_block_size": 8,
            },
            "global_allocation.*unstructured",
        ),
        ({"blocksize": 8}, "block_size"),
    ],
)
def test_bad_fields_raise(kwargs, match):
    kwargs = {"init_sparsity": 0.5, "final_sparsity": 0.5, **kwargs}
    with pytest.raises(RecipeError, match=match):
        FastCAPruningModifier(params=["re:.*weight"], **kwargs)


def test_defaults():
    mod = FastCAPruningModifier(params=["re:.*weight"], final_sparsity=0.5)
    assert (mod.num_grads, mod.damp, mod.fisher_block_size, mod.block_size) == (
        1024,
        1e-7,
        50,
        None,
    )
    assert mod.global_sparsity is False and mod.zero_dead is False


@pytest.mark.parametrize("target", [0.6, 0.75])
def test_loss_allocation_matches_the_oracle_curves(target):
    """``global_allocation: losses``: every layer is swept (column-OBS oracle) to each of
    `curve_levels`, its quadratic loss 1/2 sum_r dW_r^T (F/m + damp) dW_r / rows measured, and
    the per-layer targets are those of `loss_curve_targets` over these curves; then every
    layer is swept to its own target."""
    from sparseml.pruning.methods.fast_cap import curve_levels
    from sparseml.pruning.selectors import loss_curve_targets

    fishers = shared_fishers(mlp(), 20, 8)
    dense = [w.double().view(-1, 8) for w in weights_of(mlp())]
    curves = []
    for W, f in zip(dense, fishers):
        Fd = f / 20 + 0.01 * (f / 20).diagonal().mean() * torch.eye(8, dtype=torch.float64)
        xs, ys = [0.0], [0.0]
        for level in curve_levels(target):
            want, keep = column_obs_reference(W, f, 20, level, 1e-2, 8)
            d = want - W
            xs.append(float((~keep).sum()))
            ys.append(float(torch.einsum("rb,bc,rc->", d, Fd, d)) / 2 / W.shape[0])
        curves.append((xs, ys))
    sizes = [W.numel() for W in dense]
    targets = loss_curve_targets(curves, sizes, target * sum(sizes))
    assert abs(targets[0] - targets[1]) > 0.05  # the budget is really shared unevenly

    model = mlp()
    text = recipe(target, extra="global_sparsity: true\nglobal_allocation: losses")
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler())
    for got, W, f, t in zip(weights_of(model), dense, fishers, targets):
        want, keep = column_obs_reference(W, f, 20, t, 1e-2, 8)
        assert torch.equal(got != 0, keep.flatten())
        torch.testing.assert_close(got.double(), want.flatten(), rtol=1e-5, atol=1e-6)
    assert sum(int((w == 0).sum()) for w in weights_of(model)) == round(target * sum(sizes))
