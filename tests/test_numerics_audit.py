"""Numerics found by the audit, each against its float64 or reference oracle.

1. Full WoodTaylor's h = H g_bar in float32 at small damp: computed as x/l - Z^T(Zx)/l^2 the
   two terms cancel; `MFACInverse.mean_gradient_mul` uses the push-through closed form.
2. K-FAC's Conv2d output-gradient factor has the WoodFisher reference's scale (sums over the
   b*S rows divided by the number of examples), not S times smaller.
3. ``normalize_hgp`` normalises only the move -h, as the reference does: scores and masks do
   not depend on it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseml.curvature import kfac_factors
from sparseml.kernels.mfac import MFACInverse
from table_grads import TableGrads, one_shot


def gradient_table(m: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """m samples with a common mean (a trained net's gradients are not centred)."""
    gen = torch.Generator().manual_seed(seed)
    mean = 0.05 * torch.randn(d, generator=gen)
    return (mean + 0.05 * torch.randn(m, d, generator=gen)).to(dtype)


def exact_h(grads: torch.Tensor, damp: float) -> torch.Tensor:
    G = grads.double()
    m, d = G.shape
    F = damp * torch.eye(d, dtype=torch.float64) + G.T @ G / m
    return torch.linalg.solve(F, G.mean(dim=0))


@pytest.mark.parametrize("damp", [1e-3, 1e-5, 1e-7])
def test_mean_gradient_product_is_accurate_in_float32_at_small_damp(damp):
    grads = gradient_table(32, 600, seed=0)
    ref = exact_h(grads, damp)
    inv = MFACInverse.build(grads.clone(), damp)
    h = inv.mean_gradient_mul().double()
    assert float((h - ref).norm() / ref.norm()) < 1e-4
    if damp <= 1e-5:  # the general product cancels here: the reason for the closed form
        naive = inv.mul(grads.mean(dim=0)).double()
        assert float((naive - ref).norm() / ref.norm()) > 1e-2


def woodtaylor_net(dtype: torch.dtype, damp: float, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)).to(dtype)
    grads = gradient_table(24, 16 * 32 + 32 * 16, seed=1, dtype=dtype)
    fields = {"params": '["re:.*weight"]', "init_sparsity": 0.5, "final_sparsity": 0.5}
    fields |= {"num_grads": 24, "damp": damp, "global_sparsity": "true", **extra}
    one_shot(net, "WoodTaylorPruningModifier", fields, TableGrads(grads))
    return net


@pytest.mark.parametrize("damp", [1e-5, 1e-7])
def test_full_woodtaylor_in_float32_matches_float64(damp, one_thread):
    """The audit's case: 99.4% (damp 1e-5) and 70% (1e-7) mask agreement with float64."""
    mine, ref = woodtaylor_net(torch.float32, damp), woodtaylor_net(torch.float64, damp)
    masks = [(a == 0, b == 0) for a, b in zip(mine[0::2], ref[0::2]) for a, b in
             [(a.weight, b.weight)]]  # fmt: skip
    agree = sum(int((a == b).sum()) for a, b in masks) / sum(a.numel() for a, _ in masks)
    assert agree == 1.0
    err = max(float((a.weight.double() - b.weight).abs().max()) for a, b in
              zip(mine[0::2], ref[0::2]))  # fmt: skip
    scale = max(float(b.weight.abs().max()) for b in ref[0::2])
    assert err / scale < 1e-4


@pytest.mark.parametrize("block", [None, 8])
def test_normalize_hgp_changes_the_move_not_the_masks(block, one_thread):
    """Reference (--normalize-hgp): stats and the OBS correction use h; only the -h term of
    the update becomes -h/||h||. So the masks are those without it, and the weights differ
    by exactly h - h/||h|| wherever nothing was pruned in that block."""
    extra = {} if block is None else {"fisher_block_size": block}
    plain = woodtaylor_net(torch.float64, 1e-3, **extra)
    normal = woodtaylor_net(torch.float64, 1e-3, normalize_hgp="true", **extra)
    for a, b in zip(plain[0::2], normal[0::2]):
        assert torch.equal(a.weight == 0, b.weight == 0)
    # the difference of the two runs is one vector, h - h/||h|| (masked): its direction is h's
    diff = torch.cat([(b.weight - a.weight).reshape(-1) for a, b in zip(plain[0::2], normal[0::2])])
    kept = torch.cat([(a.weight != 0).reshape(-1) for a in plain[0::2]])
    torch.manual_seed(0)  # h from the same samples, in float64
    grads = gradient_table(24, 16 * 32 + 32 * 16, seed=1, dtype=torch.float64)
    if block is None:
        mask_before = torch.ones(grads.shape[1], dtype=torch.bool)
        h = exact_h(grads[:, mask_before], 1e-3)
        expected = (h - h / h.norm())[kept]
        torch.testing.assert_close(diff[kept], expected, rtol=1e-6, atol=1e-9)
    else:
        assert float(diff[kept].norm()) > 0


def conv_batches(b: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(b, 3, 6, 6, generator=gen)
    d = torch.randn(b, 4, 6, 6, generator=gen) / b  # gradients of a batch-mean loss
    return layer, x, d


def test_kfac_conv_gradient_factor_has_the_reference_scale():
    """WoodFisher's kfac pruner (``ComputeCovG_proper``, ``inv_covs(m_gg / num_samples)``):
    G = sum over every example and position of (b S d)(b S d)^T, over the number of examples."""
    layer, x, d = conv_batches(b=5, seed=0)
    S = 36
    [(A, G)] = kfac_factors([[(x, d)]], [layer])
    rows = (d.double() * 5 * S).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(G, rows.T @ rows / 5, rtol=1e-10, atol=1e-12)
    patches = torch.nn.functional.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(A, (patches / S).T @ (patches / S) / 5, rtol=1e-10, atol=1e-12)
