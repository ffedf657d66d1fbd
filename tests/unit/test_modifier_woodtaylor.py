"""WoodTaylor on a quadratic loss whose gradient mean and Fisher the samples fix exactly.

L(v) = 1/2 (v - w*)^T A (v - w*) + b^T v with A = damp I + g_bar g_bar^T + R R^T and the
samples g_bar +- sqrt(k) r_j: their damped empirical Fisher is A and their mean is
g_bar = grad L(w), so WoodTaylor's local model is the loss itself and its results have
closed forms: after removing Q the best loss is L(w) - 1/2 g^T H g + 1/2 u_Q^T [H]_QQ^-1 u_Q
with H = A^-1 and u = w - H g_bar.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseml.pruning import PruningModifier
from sparseml.pruning.methods import WoodTaylorPruningModifier
from table_grads import TableGrads, one_shot

DAMP, D, K = 0.05, 12, 6


class Quadratic:
    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.layer = nn.Linear(4, 3, bias=False).double()
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(3, 4, generator=gen, dtype=torch.float64))
        self.w = self.layer.weight.detach().reshape(-1).clone()
        self.g = 0.5 * torch.randn(D, generator=gen, dtype=torch.float64)
        R = 0.5 * torch.randn(D, K, generator=gen, dtype=torch.float64)
        self.A = DAMP * torch.eye(D, dtype=torch.float64) + torch.outer(self.g, self.g) + R @ R.T
        self.w_star = torch.randn(D, generator=gen, dtype=torch.float64)
        self.b = self.g - self.A @ (self.w - self.w_star)  # grad L(w) = g_bar
        v = K**0.5 * R.T
        self.table = torch.cat([self.g + v, self.g - v])  # m = 2K samples
        self.H = torch.linalg.inv(self.A)

    def fresh(self) -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 3, bias=False).double())
        with torch.no_grad():
            model[0].weight.copy_(self.w.view(3, 4))
        return model

    def loss(self, v: torch.Tensor) -> float:
        e = v - self.w_star
        return float(0.5 * e @ self.A @ e + self.b @ v)

    def best_with_zeros(self, drop: torch.Tensor) -> torch.Tensor:
        """argmin L(v) subject to v[drop] = 0, by a direct solve on the free coordinates."""
        free = ~drop
        rhs = (self.A @ self.w_star - self.b)[free]
        v = torch.zeros(D, dtype=torch.float64)
        v[free] = torch.linalg.solve(self.A[free][:, free], rhs)
        return v

    def prune(self, tag: str, s: float, **extra) -> torch.Tensor:
        model = self.fresh()
        fields = {
            "params": '["re:.*weight"]',
            "init_sparsity": s,
            "final_sparsity": s,
            "num_grads": 2 * K,
            "damp": DAMP,
            **extra,
        }
        one_shot(model, tag, fields, TableGrads(self.table))
        return model[0].weight.detach().reshape(-1).clone()


@pytest.mark.parametrize("seed", range(4))
def test_woodtaylor_reaches_the_closed_form_and_beats_obs(seed: int, one_thread) -> None:
    q = Quadratic(seed)
    u = q.w - q.H @ q.g
    for s in (1 / D, 0.25, 0.5):
        joint = q.prune("WoodTaylorPruningModifier", s, fisher_block_size=D, obs_update="joint")
        drop = joint == 0
        assert int(drop.sum()) == round(s * D)
        # the scores are 1/2 u_q^2 / H_qq: the removed ones are the lowest
        scores = u.square() / (2 * q.H.diagonal())
        assert scores[drop].max() <= scores[~drop].min()
        torch.testing.assert_close(joint, q.best_with_zeros(drop))
        Hqq = q.H[drop][:, drop]
        closed = (
            q.loss(q.w) - 0.5 * q.g @ q.H @ q.g + 0.5 * u[drop] @ torch.linalg.solve(Hqq, u[drop])
        )
        assert q.loss(joint) == pytest.approx(float(closed), rel=1e-9)
        obs = q.prune("OBSPruningModifier", s, fisher_block_size=D)
        assert int((obs == 0).sum()) == round(s * D)
        assert q.loss(joint) <= q.loss(obs) + 1e-12
    # the full (matrix-free) form removing one weight is the exact single-weight solution
    full = q.prune("WoodTaylorPruningModifier", 1 / D)
    torch.testing.assert_close(full, q.best_with_zeros(full == 0))


def test_every_kept_weight_moves_along_minus_h(one_thread) -> None:
    # blocks of 4: one weight goes, so two blocks lose nothing and move by exactly -H_b g_b
    q = Quadratic(0)
    for normalize in (False, True):
        v = q.prune(
            "WoodTaylorPruningModifier", 1 / D, fisher_block_size=4, normalize_hgp=normalize
        )
        h = torch.cat(
            [torch.linalg.solve(q.A[b : b + 4, b : b + 4], q.g[b : b + 4]) for b in (0, 4, 8)]
        )
        if normalize:
            h = h / h.norm()
        untouched = [b for b in (0, 4, 8) if (v[b : b + 4] != 0).all()]
        assert len(untouched) == 2
        for b in untouched:
            torch.testing.assert_close(v[b : b + 4], q.w[b : b + 4] - h[b : b + 4])


@pytest.mark.parametrize("block", [None, 4])
def test_pruned_weights_stay_exactly_zero(block, monkeypatch, one_thread) -> None:
    q = Quadratic(1)
    after = []
    step = WoodTaylorPruningModifier.prune_once

    def record(self, module, targets, timings):
        step(self, module, targets, timings)
        after.append(module[0].weight.detach().reshape(-1).clone())

    monkeypatch.setattr(WoodTaylorPruningModifier, "prune_once", record)
    extra = {"num_recomputations": 3} | ({} if block is None else {"fisher_block_size": block})
    final = q.prune("WoodTaylorPruningModifier", 0.75, **extra)
    assert len(after) == 3
    for before, later in zip(after, after[1:]):
        assert (later[before == 0] == 0).all()  # masks never reopen, zeros stay exact
    assert int((final == 0).sum()) == round(0.75 * D)


def test_one_pass_gives_fisher_and_mean(monkeypatch, one_thread) -> None:
    q = Quadratic(2)
    calls = []
    chunks = PruningModifier.gradient_chunks

    def counting(self, module, num_grads=None, **kwargs):
        calls.append(1)
        return chunks(self, module, num_grads, **kwargs)

    monkeypatch.setattr(PruningModifier, "gradient_chunks", counting)
    q.prune("WoodTaylorPruningModifier", 0.5, fisher_block_size=4)
    q.prune("WoodTaylorPruningModifier", 0.5)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_full_woodtaylor_masks_equal_float32_math(dtype, one_thread) -> None:
    # the contract test runs the blockwise form (it sets fisher_block_size); the matrix-free
    # form must equally give float32 math's masks whatever the parameters' dtype
    def run(dt):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.02)
        net = net.to(dtype).to(dt)  # the same (rounded) starting values in every run
        grads = 0.05 * torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
        fields = {"params": '["re:.*weight"]', "init_sparsity": 0.6, "final_sparsity": 0.6}
        fields |= {"num_grads": 16, "damp": 0.01, "global_sparsity": "true"}
        one_shot(net, "WoodTaylorPruningModifier", fields, TableGrads(grads))
        return net

    mine, ref = run(dtype), run(torch.float32)
    for a, b in zip(mine.parameters(), ref.parameters()):
        assert a.dtype == dtype
        assert torch.equal(a == 0, b == 0)
        torch.testing.assert_close(a.float(), b.to(dtype).float())
