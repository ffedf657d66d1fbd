"""FastCAP's row-aligned shared Fisher (``fisher_layout: rows``) against a brute-force oracle.

A conv (rows of in_channels * kh * kw = 8) and a Linear (rows of in_features = 12) on tiny
images: each layer's Fisher is built here sample by sample from its gradients cut into its own
rows, the per-layer targets come from one threshold over w^2 / [(F[j:, j:])^-1]_00 of both
layers (explicit inverses), and each layer is swept by the column-OBS oracle.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseml.errors import RecipeError
from sparseml.pruning.estimators.shared import row_block
from sparseml.pytorch.optim import ScheduledModifierManager
from test_kernel_fast_cap import column_obs_reference

M = 12  # gradient samples
RECIPE = """
pruning_modifiers:
  - !FastCAPruningModifier
    params: ["re:.*weight"]
    init_sparsity: {s}
    final_sparsity: {s}
    start_epoch: 0
    end_epoch: 1
    update_frequency: 1
    num_grads: {m}
    damp: 0.01
    fisher_block_size: {cap}
    global_sparsity: {glob}
{extra}"""


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 5))


def builder(**kwargs):
    gen = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(6, 2, 3, 3, generator=gen)
        yield [x], {}, torch.tanh(x.flatten(1)[:, :5] - x.flatten(1)[:, 5:10])


def weights(model) -> list[torch.Tensor]:
    return [model[0].weight.detach(), model[3].weight.detach()]


def brute_fishers(blocks: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: sum over the M samples of G^T G, G the gradient cut into rows of its B, and
    per row the sum over the samples of its squared norm."""
    model, batches = net(), builder()
    fishers = [torch.zeros(b, b, dtype=torch.float64) for b in blocks]
    energies = [
        torch.zeros(w.numel() // b, dtype=torch.float64) for w, b in zip(weights(model), blocks)
    ]
    model.eval()
    for _ in range(M):
        args, _, target = next(batches)
        model.zero_grad()
        F.mse_loss(model(*args), target).backward()
        for p, f, e, b in zip((model[0].weight, model[3].weight), fishers, energies, blocks):
            g = p.grad.double().reshape(-1, b)
            for r, row in enumerate(g):  # one outer product per row: no shortcut from the code
                f += torch.outer(row, row)
                e[r] += float(row @ row)
    return fishers, energies


def oracle(
    blocks: list[int], sparsity: float, glob: bool, scaled: bool = False
) -> list[tuple[torch.Tensor, ...]]:
    """Global scores are per row of the layer (F sums its rows), times each row's energy over
    the mean row's when ``scaled``."""
    fishers, energies = brute_fishers(blocks)
    dense = [w.double().reshape(-1, b) for w, b in zip(weights(net()), blocks)]
    scales = [e / e.mean() if scaled else None for e in energies]
    targets = [sparsity] * 2
    if glob:
        scores = []
        for W, f, b, sc in zip(dense, fishers, blocks, scales):
            Fd = f / M + 0.01 * (f / M).diagonal().mean() * torch.eye(b, dtype=torch.float64)
            d = torch.tensor([torch.linalg.inv(Fd[j:, j:])[0, 0] for j in range(b)])
            per_row = W**2 / d / W.shape[0]
            scores.append((per_row if sc is None else per_row * sc[:, None]).flatten())
        flat = torch.cat(scores)
        order = torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]
        pruned = torch.zeros(flat.numel(), dtype=torch.bool)
        pruned[order] = True
        parts = pruned.split([s.numel() for s in scores])
        targets = [float(p.sum()) / p.numel() for p in parts]
    return [
        column_obs_reference(W, f, M, t, 1e-2, b, row_scale=sc)
        for W, f, b, t, sc in zip(dense, fishers, blocks, targets, scales)
    ]


def prune(sparsity: float, cap: int, glob: bool, extra: str = "") -> nn.Module:
    text = RECIPE.format(s=sparsity, m=M, cap=cap, glob=str(glob).lower(), extra=extra)
    model = net()
    sampler = {"data_loader_builder": builder, "loss_fn": F.mse_loss}
    ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler)
    return model


@pytest.mark.parametrize(
    "cap,blocks,glob",
    [(64, [8, 12], True), (64, [8, 12], False), (6, [4, 6], False)],
)
def test_rows_layout_matches_brute_force_oracle(cap, blocks, glob):
    model = prune(0.5, cap, glob, "    fisher_layout: rows\n")
    for got, (want, keep) in zip(weights(model), oracle(blocks, 0.5, glob)):
        assert torch.equal(got.reshape(-1) != 0, keep.flatten())
        torch.testing.assert_close(got.double().reshape(-1), want.flatten(), rtol=1e-5, atol=1e-6)
    if glob:  # the shared budget lands unevenly on the two layers
        assert len({round(float((w == 0).float().mean()), 3) for w in weights(model)}) == 2


@pytest.mark.parametrize("glob", [True, False])
def test_row_scaling_matches_brute_force_oracle(glob):
    model = prune(0.5, 64, glob, "    fisher_layout: rows\n    row_scaling: true\n")
    for got, (want, keep) in zip(weights(model), oracle([8, 12], 0.5, glob, scaled=True)):
        assert torch.equal(got.reshape(-1) != 0, keep.flatten())
        torch.testing.assert_close(got.double().reshape(-1), want.flatten(), rtol=1e-5, atol=1e-6)
    plain = prune(0.5, 64, glob, "    fisher_layout: rows\n")
    assert not all(torch.equal(a != 0, b != 0) for a, b in zip(weights(model), weights(plain)))


def test_fixed_layout_is_the_reference_and_differs_from_rows():
    """The default cuts both flattenings into runs of fisher_block_size (here 6: a conv run
    spans two input channels' rows), as the reference does; the rows layout prunes otherwise."""
    fixed = prune(0.5, 6, False)
    for got, (want, keep) in zip(weights(fixed), oracle([6, 6], 0.5, False)):
        assert torch.equal(got.reshape(-1) != 0, keep.flatten())
        torch.testing.assert_close(got.double().reshape(-1), want.flatten(), rtol=1e-5, atol=1e-6)
    rows = prune(0.5, 6, False, "    fisher_layout: rows\n")
    assert not torch.equal(weights(fixed)[0] != 0, weights(rows)[0] != 0)


def test_row_block_picks_the_largest_fitting_divisor():
    assert row_block((128, 64, 3, 3), 2048) == 576
    assert row_block((128, 64, 3, 3), 96) == 96
    assert row_block((10, 144), 100) == 72
    assert row_block((10, 12), 5, group=4) == 4
    with pytest.raises(ValueError, match="no divisor of the row length 6"):
        row_block((10, 6), 8, group=4)


def test_bad_layout_and_unfit_rows_are_one_line_errors():
    with pytest.raises(RecipeError, match="fisher_layout.*rowz"):
        prune(0.5, 8, False, "    fisher_layout: rowz\n")
    # rows of 12 and 8 weights: 3:8 groups do not divide the Linear's rows of 12
    with pytest.raises(RecipeError, match="mask_type.*3.weight.*rows of 12"):
        prune(0.375, 64, False, '    fisher_layout: rows\n    mask_type: "3:8"\n')
