"""CAP's weights replayed from the elimination's factors (`cap_eliminate_factored` +
`cap_prefix_weights`) against the closed-form joint OBS rebuild from an intact H
(`cap_reconstruct`) and the plain greedy loop."""

from __future__ import annotations

import pytest
import torch

from sparseml.kernels import native
from sparseml.kernels.cap import (
    cap_eliminate,
    cap_eliminate_factored,
    cap_prefix_weights,
    cap_reconstruct,
)
from sparseml.kernels.packed import SymBlocks, pack

f64 = torch.float64
pytestmark = pytest.mark.skipif(not native.ENABLED, reason="numba is not installed")


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def problem(n_b, B, m, damp, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n_b, m, B, generator=gen, dtype=f64)
    H = torch.linalg.inv(g.mT @ g / m + damp * torch.eye(B, dtype=f64))
    W = torch.randn(n_b, B, generator=gen, dtype=f64)
    return H, W


@pytest.mark.parametrize("damp", [1e-2, 1e-6])
@pytest.mark.parametrize("per_step", [False, True])
def test_replay_is_the_joint_obs_rebuild(damp, per_step):
    n_b, B = 10, 24
    H, W = problem(n_b, B, 40, damp, seed=1)
    gen = torch.Generator().manual_seed(2)
    pruned = torch.rand(n_b, B, generator=gen) < 0.25  # coupled: every H entry is nonzero
    pruned[:3] = False
    valid = torch.ones(n_b, B, dtype=torch.bool)
    valid[-1, 17:] = False  # a padded last block
    W = W.masked_fill(pruned | ~valid, 0.0)
    W[4, int(pruned[4].nonzero()[0])] = 0.5  # a removed weight that is not zero: not replayed
    packed = SymBlocks(pack(H), B)
    kwargs = {"valid": valid, "blocks_per_batch": 3, "per_step": per_step}
    order, losses, replay = cap_eliminate_factored(W, packed, pruned, **kwargs)
    order_ref, losses_ref = cap_eliminate(W, SymBlocks(pack(H), B), pruned, **kwargs)
    assert torch.equal(order, order_ref) and torch.equal(losses, losses_ref)
    assert replay.tolist() == [b != 4 for b in range(n_b)]
    assert torch.equal(packed.data[4], pack(H)[4])  # not replayed: H kept
    assert not torch.equal(packed.data[0], pack(H)[0])  # replayed: factors in its place
    pre = pruned | ~valid
    for trial in range(6):
        extra = torch.randint(0, B + 1, (n_b,), generator=gen)
        counts = torch.minimum(pre.sum(1) + extra, torch.full((n_b,), B))
        got = cap_prefix_weights(W, packed, order, counts, replay, pre)
        want = cap_reconstruct(W, SymBlocks(pack(H), B), order, counts)
        tol = 1e-10 if damp > 1e-3 else 1e-6
        assert rel(got, want) < tol, trial
        removed = torch.arange(B) < counts[:, None]
        assert bool((got.gather(1, order.long()) * removed == 0).all())


def test_replay_gives_the_greedy_loops_weights():
    n_b, B = 4, 16
    H, W = problem(n_b, B, 20, 1e-3, seed=3)
    packed = SymBlocks(pack(H), B)
    none = torch.zeros(n_b, B, dtype=torch.bool)
    order, _, replay = cap_eliminate_factored(W, packed, none)
    assert bool(replay.all())
    for k in (1, 5, 11, B):
        got = cap_prefix_weights(W, packed, order, torch.full((n_b,), k), replay, none)
        for b in range(n_b):  # the plain loop: OBS update and Schur downdate, k steps
            w, h = W[b].clone(), H[b].clone()
            for p in order[b, :k].long().tolist():
                w = w - w[p] / h[p, p] * h[:, p]
                h = h - torch.outer(h[:, p], h[p, :]) / h[p, p]
            if k == B:  # every weight removed
                assert bool((got[b] == 0).all())
            else:
                w[order[b, :k].long()] = 0.0
                assert rel(got[b], w) < 1e-10


def test_full_blocks_and_the_torch_path_keep_h(monkeypatch):
    n_b, B = 3, 8
    H, W = problem(n_b, B, 12, 1e-2, seed=4)
    none = torch.zeros(n_b, B, dtype=torch.bool)
    _, _, replay = cap_eliminate_factored(W, H, none)  # full (n_b, B, B) blocks: no factors
    assert not replay.any()
    packed = SymBlocks(pack(H), B)
    with monkeypatch.context() as m:
        m.setattr(native, "ENABLED", False)
        order, _, replay = cap_eliminate_factored(W, packed, none)
    assert not replay.any() and torch.equal(packed.data, pack(H))
    counts = torch.tensor([2, 5, 8])
    got = cap_prefix_weights(W, packed, order, counts, replay, none)
    assert torch.equal(got, cap_reconstruct(W, packed, order, counts))


def test_a_removed_set_that_does_not_lead_the_order_is_refused():
    n_b, B = 3, 8
    H, W = problem(n_b, B, 12, 1e-2, seed=5)
    pruned = torch.zeros(n_b, B, dtype=torch.bool)
    pruned[:, 0] = True
    W[:, 0] = 0.0
    packed = SymBlocks(pack(H), B)
    order, _, replay = cap_eliminate_factored(W, packed, pruned)
    counts = torch.full((n_b,), 4)
    other = torch.zeros_like(pruned)
    other[:, 1] = True  # not the set the elimination removed first
    with pytest.raises(ValueError, match="leads the order"):
        cap_prefix_weights(W, packed, order, counts, replay, other)
    with pytest.raises(ValueError, match="leads the order"):  # fewer than the removed ones
        cap_prefix_weights(W, packed, order, torch.zeros(n_b, dtype=torch.long), replay, pruned)
