"""OBS scores and joint updates against dense float64 brute force."""

from __future__ import annotations

import pytest
import torch

from sparseml.kernels.fisher import accumulate_block_gram, invert_block_fisher, num_blocks
from sparseml.kernels.obs import (
    obs_group_scores,
    obs_independent_update,
    obs_loss,
    obs_prune_update,
    obs_scores,
)

F64 = torch.float64


def _problem(d: int, block_size: int, m: int, damp: float, seed: int, dead=()):
    """Random correlated gradients -> (w, H (n_b,B,B) float64, dense F (d,d) float64)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, d, generator=gen, dtype=F64)
    grads = base + 0.8 * torch.roll(base, 1, dims=1) + 0.3 * base[:, :1]
    w = torch.randn(d, generator=gen, dtype=F64)
    grads[:, list(dead)] = 0
    w[list(dead)] = 0
    n_b = num_blocks(d, block_size)
    gram = torch.zeros(n_b, block_size, block_size, dtype=F64)
    H = invert_block_fisher(accumulate_block_gram(grads, block_size, out=gram), m, damp)
    F = damp * torch.eye(d, dtype=F64)
    for b in range(n_b):
        sl = slice(b * block_size, min(d, (b + 1) * block_size))
        F[sl, sl] += grads[:, sl].T @ grads[:, sl] / m
    return w, H, F


def _constrained_argmin(w: torch.Tensor, F: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """argmin_{v: v_Q = 0} (v - w)^T F (v - w) as a least-squares problem ||R (P z - w)||."""
    R = torch.linalg.cholesky(F).T  # F = R^T R
    free = (~Q).nonzero().squeeze(-1)
    z = torch.linalg.lstsq(R[:, free], (R @ w).unsqueeze(-1)).solution.squeeze(-1)
    v = torch.zeros_like(w)
    v[free] = z
    return v


def _quad(v: torch.Tensor, w: torch.Tensor, F: torch.Tensor) -> float:
    return 0.5 * float((v - w) @ F @ (v - w))


def _dense_H(H: torch.Tensor, d: int) -> torch.Tensor:
    return torch.block_diag(*H)[:d, :d]


def test_scores_equal_formula() -> None:
    w, H, _ = _problem(13, 4, 6, 1e-2, seed=0, dead=(2,))
    pruned = torch.zeros(13, dtype=torch.bool)
    pruned[[2, 7]] = True
    scores = obs_scores(w, H, pruned)
    expected = w**2 / (2 * torch.diagonal(_dense_H(H, 13)))
    assert torch.isneginf(scores[pruned]).all()
    torch.testing.assert_close(scores[~pruned], expected[~pruned], rtol=1e-12, atol=0)
    eps_scores = obs_scores(w, H, pruned, eps=1.0)
    torch.testing.assert_close(eps_scores[0], w[0] ** 2 / (2 * H[0, 0, 0] + 1.0))


@pytest.mark.parametrize(
    ("d", "block_size", "m"), [(16, 4, 3), (16, 8, 20), (14, 4, 5), (11, 16, 4)]
)
def test_prune_update_equals_constrained_least_squares(d: int, block_size: int, m: int) -> None:
    w, H, F = _problem(d, block_size, m, 1e-2, seed=d + block_size)
    gen = torch.Generator().manual_seed(1)
    for frac in (0.2, 0.5, 0.8, 1.0):
        Q = torch.rand(d, generator=gen) < frac
        v = obs_prune_update(w, H, Q)
        expected = _constrained_argmin(w, F, Q)
        torch.testing.assert_close(v, expected, rtol=1e-8, atol=1e-8)
        assert torch.count_nonzero(v[Q]) == 0
        assert obs_loss(w, H, Q) == pytest.approx(_quad(expected, w, F), rel=1e-8)


def test_previously_pruned_coordinates_stay_exactly_zero() -> None:
    dead = (1, 6, 9)
    w, H, F = _problem(12, 4, 5, 1e-3, seed=3, dead=dead)
    Q = torch.zeros(12, dtype=torch.bool)
    Q[[0, 1, 5, 10]] = True  # includes the previously pruned coordinate 1
    v = obs_prune_update(w, H, Q)
    assert torch.count_nonzero(v[list(dead)]) == 0
    torch.testing.assert_close(v, _constrained_argmin(w, F, Q), rtol=1e-8, atol=1e-8)
    # including them or not gives the same result
    Q2 = Q.clone()
    Q2[[1, 6, 9]] = False
    assert torch.equal(obs_prune_update(w, H, Q2).masked_fill(Q, 0), v)


def test_one_weight_per_block_equals_independent_update() -> None:
    w, H, F = _problem(16, 4, 6, 1e-2, seed=4)
    Q = torch.zeros(16, dtype=torch.bool)
    Q[[1, 4, 11, 15]] = True
    joint = obs_prune_update(w, H, Q)
    torch.testing.assert_close(joint, obs_independent_update(w, H, Q), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(joint, _constrained_argmin(w, F, Q), rtol=1e-8, atol=1e-8)


def test_joint_beats_independent_and_magnitude_at_equal_sparsity() -> None:
    d, k = 64, 32
    w, H, F = _problem(d, 16, 8, 1e-3, seed=5)
    none = torch.zeros(d, dtype=torch.bool)
    q_obs = torch.zeros(d, dtype=torch.bool)
    q_obs[torch.argsort(obs_scores(w, H, none))[:k]] = True
    q_mag = torch.zeros(d, dtype=torch.bool)
    q_mag[torch.argsort(w.abs())[:k]] = True
    joint = _quad(obs_prune_update(w, H, q_obs), w, F)
    indep = _quad(obs_independent_update(w, H, q_obs), w, F)
    magnitude = _quad(w.masked_fill(q_mag, 0), w, F)
    assert joint == pytest.approx(obs_loss(w, H, q_obs), rel=1e-8)
    assert joint < indep and joint < magnitude
    assert joint < 0.9 * indep  # correlated weights: the independent sum is clearly worse
    # with the magnitude mask too, the joint update improves on plain zeroing
    assert _quad(obs_prune_update(w, H, q_mag), w, F) < magnitude


@pytest.mark.parametrize(
    ("d", "block_size", "group", "dead"),
    [(16, 8, 4, (0, 1, 2, 3, 5)), (24, 8, 2, (5,)), (18, 8, 4, (9, 16, 17)), (18, 8, 4, (17,))],
)
def test_group_scores_equal_brute_force(d: int, block_size: int, group: int, dead) -> None:
    # (18, 8, 4): the group {16, 17} + padding is fully pruned when both 16 and 17 are.
    w, H, F = _problem(d, block_size, 5, 1e-2, seed=6, dead=dead)
    pruned = torch.zeros(d, dtype=torch.bool)
    pruned[list(dead)] = True
    scores = obs_group_scores(w, H, pruned, group)
    Hd = _dense_H(H, d)
    for start in range(0, d, group):
        Q = torch.arange(start, min(d, start + group))
        got = scores[Q]
        assert torch.equal(got, got[:1].expand_as(got))  # broadcast to all members
        if pruned[Q].all():
            assert torch.isneginf(got).all()
            continue
        expected = 0.5 * w[Q] @ torch.linalg.solve(Hd[Q][:, Q], w[Q])
        mask = torch.zeros(d, dtype=torch.bool)
        mask[Q] = True
        brute = _quad(_constrained_argmin(w, F, mask), w, F)
        assert got[0].item() == pytest.approx(float(expected), rel=1e-9)
        assert got[0].item() == pytest.approx(brute, rel=1e-7)


def test_float32_inputs_keep_dtype() -> None:
    w, H, _ = _problem(40, 8, 10, 1e-2, seed=7)
    Q = torch.zeros(40, dtype=torch.bool)
    Q[::3] = True
    v = obs_prune_update(w.float(), H.float(), Q)
    assert v.dtype == torch.float32 and torch.count_nonzero(v[Q]) == 0
    torch.testing.assert_close(v.double(), obs_prune_update(w, H, Q), rtol=1e-4, atol=1e-4)
    assert obs_group_scores(w.float(), H.float(), Q, 4).dtype == torch.float32


def test_bad_inputs_raise_value_error() -> None:
    w, H, _ = _problem(16, 8, 4, 1e-2, seed=8)
    none = torch.zeros(16, dtype=torch.bool)
    with pytest.raises(ValueError, match="group size"):
        obs_group_scores(w, H, none, 3)
    with pytest.raises(ValueError, match="blocks"):
        obs_scores(w[:8], H, none[:8])
    with pytest.raises(ValueError, match="prune must be a bool"):
        obs_prune_update(w, H, none.float())


def test_group_independent_update_equals_joint_with_one_group_per_block() -> None:
    w, H, F = _problem(24, 12, 6, 1e-2, seed=9)
    Q = torch.zeros(24, dtype=torch.bool)
    Q[[4, 5, 6, 7, 16, 17, 18, 19]] = True  # one group of 4 in each block
    indep = obs_independent_update(w, H, Q, group=4)
    torch.testing.assert_close(indep, _constrained_argmin(w, F, Q), rtol=1e-8, atol=1e-8)
    Q[[0, 1, 2, 3]] = True  # two groups in block 0: the independent sum is now worse
    joint, indep = obs_prune_update(w, H, Q), obs_independent_update(w, H, Q, group=4)
    assert torch.count_nonzero(indep[Q]) == 0
    assert _quad(joint, w, F) < _quad(indep, w, F)
