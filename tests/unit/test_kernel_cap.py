"""Oracle tests for the CAP kernels (greedy elimination, closed-form reconstruction, N:M)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparseml.errors import NumericalError
from sparseml.kernels import cap_greedy, native
from sparseml.kernels.cap import (
    cap_eliminate,
    cap_nm_prune,
    cap_reconstruct,
    prefix_counts,
    prefix_mask,
)

f64 = torch.float64


@pytest.fixture(autouse=True, params=["compiled", "torch", 2, 3])
def lazy_steps(request, monkeypatch):
    """Every oracle test runs the compiled CPU greedy (`sparseml.kernels.native`) and the torch
    one (the accelerator path), the latter also with the pending downdates applied every 2 and
    3 steps, so the blocked (lazy) path, its flushes and compactions are checked on small B."""
    if request.param != "compiled":
        monkeypatch.setattr(native, "ENABLED", False)
    if isinstance(request.param, int):
        monkeypatch.setattr(cap_greedy, "_LAZY", request.param)


def make_problem(n_b=5, B=6, m=4, damp=1e-2, seed=0, corr=0.0, grad_mask=None):
    """Random W and inverse Fisher H = (damp I + G^T G / m)^-1 per block, all float64."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n_b, m, B, generator=g, dtype=f64)
    G = G + corr * G.mean(2, keepdim=True)  # a shared direction correlates the coordinates
    if grad_mask is not None:
        G = G * grad_mask.unsqueeze(1)
    F = G.mT @ G / m + damp * torch.eye(B, dtype=f64)
    W = torch.randn(n_b, B, generator=g, dtype=f64)
    return W, F, torch.linalg.inv(F)


def joint_obs(w, F, S):
    """argmin_{v: v_S = 0} (v - w)^T F (v - w) and half its minimum, from F (not H)."""
    S = torch.as_tensor(sorted(S), dtype=torch.long)
    R = torch.tensor([j for j in range(w.numel()) if j not in set(S.tolist())], dtype=torch.long)
    delta = torch.zeros_like(w)
    delta[S] = -w[S]
    if R.numel():
        delta[R] = torch.linalg.solve(F[R][:, R], -F[R][:, S] @ delta[S])
    return w + delta, 0.5 * float(delta @ F @ delta)


def reference_greedy(w, h, forced=()):
    """The paper's loop with weight traces, float64: returns order, cumulative losses, traces."""
    w, h = w.clone(), h.clone()
    B = w.numel()
    elim = torch.zeros(B, dtype=torch.bool)
    order, losses, traces, cum = [], [], [w.clone()], 0.0
    for t in range(B):
        s = w * w / h.diagonal()
        s[elim] = float("inf")
        p = forced[t] if t < len(forced) else int(s.argmin())
        cum += 0.0 if t < len(forced) else 0.5 * float(s[p])
        order.append(p)
        losses.append(cum)
        w -= w[p] / h[p, p] * h[:, p]
        elim[p] = True
        w[elim] = 0
        traces.append(w.clone())
        h -= torch.outer(h[:, p], h[p, :]) / h[p, p]
    return order, losses, traces


def test_prefixes_are_joint_obs_solutions():
    W, F, H = make_problem(n_b=4, B=6, corr=1.0)
    H_before = H.clone()
    order, losses = cap_eliminate(W, H, torch.zeros_like(W, dtype=torch.bool))
    assert torch.equal(H, H_before)  # the caller's inverse is left intact
    assert order.dtype == torch.int16 and losses.dtype == torch.float32
    for t in range(7):
        W_new = cap_reconstruct(W, H, order, torch.full((4,), t))
        for b in range(4):
            S = order[b, :t].long().tolist()
            v, loss = joint_obs(W[b], F[b], S)
            torch.testing.assert_close(W_new[b], v, rtol=1e-9, atol=1e-10)
            assert torch.all(W_new[b, S] == 0)
            if t:
                HS = H[b][S][:, S]
                expect = 0.5 * float(W[b, S] @ torch.linalg.solve(HS, W[b, S]))
                assert loss == pytest.approx(expect, rel=1e-9)
                assert float(losses[b, S[-1]]) == pytest.approx(expect, rel=1e-5)


def test_matches_reference_loop_with_traces():
    W, F, H = make_problem(n_b=7, B=8, m=5, seed=1, corr=0.5)
    order, losses = cap_eliminate(W, H, torch.zeros_like(W, dtype=torch.bool), blocks_per_batch=3)
    counts = torch.tensor([0, 1, 3, 4, 6, 7, 8])
    W_new = cap_reconstruct(W, H, order, counts, blocks_per_batch=2)
    for b in range(7):
        ref_order, ref_losses, traces = reference_greedy(W[b], H[b])
        assert order[b].tolist() == ref_order
        assert losses[b, ref_order].double().tolist() == pytest.approx(ref_losses, rel=1e-5)
        torch.testing.assert_close(W_new[b], traces[int(counts[b])], rtol=1e-8, atol=1e-10)


def test_per_step_losses_are_the_reference_increments():
    W, _, H = make_problem(n_b=7, B=8, m=5, seed=4, corr=0.5)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    pruned[2, [0, 5]] = True
    W = W.masked_fill(pruned, 0.0)
    order_c, cum = cap_eliminate(W, H, pruned, blocks_per_batch=3)
    order, steps = cap_eliminate(W, H, pruned, blocks_per_batch=3, per_step=True)
    assert torch.equal(order, order_c)  # the ranking changes the scores, not the greedy
    for b in range(7):
        forced = [j for j in range(8) if pruned[b, j]]
        ref_order, ref_cum, _ = reference_greedy(W[b], H[b], forced)
        inc = [c - p for c, p in zip(ref_cum, [0.0, *ref_cum[:-1]])]
        assert order[b].tolist() == ref_order
        got = steps[b, ref_order].double().tolist()
        assert got == pytest.approx(inc, rel=1e-5, abs=1e-12)
        # the increments sum back to the (monotone) cumulative losses
        assert sum(got) == pytest.approx(float(cum[b, ref_order[-1]]), rel=1e-5)


def test_batching_does_not_change_results():
    W, _, H = make_problem(n_b=9, B=8, seed=2)
    pruned = torch.rand(9, 8, generator=torch.Generator().manual_seed(0)) < 0.3
    W = W.masked_fill(pruned, 0.0)
    ref = cap_eliminate(W, H, pruned, blocks_per_batch=1)
    for bpb in (2, 4, None):
        out = cap_eliminate(W, H, pruned, blocks_per_batch=bpb)
        assert torch.equal(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])


def subset_loss(w, h, S):
    S = torch.as_tensor([int(j) for j in S], dtype=torch.long)
    return 0.5 * float(w[S] @ torch.linalg.solve(h[S][:, S], w[S]))


def test_greedy_vs_obs_and_brute_force():
    B, n_b = 6, 40
    W, _, H = make_problem(n_b=n_b, B=B, m=3, damp=1e-3, seed=3, corr=2.0)
    order, losses = cap_eliminate(W, H, torch.zeros_like(W, dtype=torch.bool))
    obs_scores = W**2 / H.diagonal(dim1=1, dim2=2)
    for k in range(1, B + 1):
        cap = torch.tensor([subset_loss(W[b], H[b], order[b, :k]) for b in range(n_b)], dtype=f64)
        # The recorded loss of the k-th pivot is the joint loss of the prefix.
        recorded = losses[torch.arange(n_b), order[:, k - 1].long()].double()
        torch.testing.assert_close(recorded, cap, rtol=1e-5, atol=1e-7)
        obs = torch.tensor(
            [subset_loss(W[b], H[b], obs_scores[b].argsort()[:k]) for b in range(n_b)], dtype=f64
        )
        subsets = list(itertools.combinations(range(B), k))
        best = torch.tensor(
            [min(subset_loss(W[b], H[b], S) for S in subsets) for b in range(n_b)], dtype=f64
        )
        assert torch.all(best <= cap * (1 + 1e-9))
        assert torch.all(best <= obs * (1 + 1e-9))
        if k in (1, B):  # a single removal (and removing all) is solved exactly by both
            torch.testing.assert_close(cap, best)
            torch.testing.assert_close(obs, best)
        else:  # greedy re-scoring beats one-shot scores on correlated blocks
            assert cap.sum() < obs.sum()
            assert (cap <= obs * (1 + 1e-9)).float().mean() >= 0.9


@pytest.mark.parametrize("coupled", [False, True])
def test_pre_pruned_are_eliminated_first_and_stay_zero(coupled):
    n_b, B = 6, 8
    g = torch.Generator().manual_seed(4)
    pruned = torch.rand(n_b, B, generator=g) < 0.4
    pruned[0] = False
    pruned[1] = True
    # Masked gradients decouple pruned coordinates; a generic H couples them.
    W, F, H = make_problem(n_b=n_b, B=B, seed=4, grad_mask=None if coupled else ~pruned)
    W = W.masked_fill(pruned, 0.0)
    order, losses = cap_eliminate(W, H, pruned)
    npre = pruned.sum(1)
    for b in range(n_b):
        first = order[b, : npre[b]].long()
        assert first.tolist() == pruned[b].nonzero().squeeze(1).tolist()
        assert torch.all(losses[b, first] == 0)
        ref_order, ref_losses, traces = reference_greedy(W[b], H[b], forced=first.tolist())
        assert order[b].tolist() == ref_order
        assert losses[b, ref_order].double().tolist() == pytest.approx(ref_losses, rel=1e-5)
    counts = torch.minimum(npre + 2, torch.full_like(npre, B))
    W_new = cap_reconstruct(W, H, order, counts)
    assert torch.all(W_new[pruned] == 0)
    assert torch.equal(prefix_mask(order, counts), W_new != 0)
    if not coupled:  # removing only the pre-pruned set changes nothing
        torch.testing.assert_close(cap_reconstruct(W, H, order, npre), W)


def global_threshold_round(W, H, pruned, sparsity):
    """One pruning step as a modifier would do it: global k-selection, prefixes, reconstruction."""
    order, losses = cap_eliminate(W, H, pruned)
    scores = losses.masked_fill(pruned, -float("inf")).flatten()
    k = round(sparsity * W.numel())
    chosen = torch.zeros(W.numel(), dtype=torch.bool)
    chosen[torch.argsort(scores, stable=True)[:k]] = True
    counts = prefix_counts(order, chosen.view_as(W))
    return cap_reconstruct(W, H, order, counts), prefix_mask(order, counts)


def test_second_call_keeps_unpruned_weights():
    n_b, B = 8, 8
    W, _, H = make_problem(n_b=n_b, B=B, seed=5)
    none = torch.zeros_like(W, dtype=torch.bool)
    W1, mask1 = global_threshold_round(W, H, none, 0.5)
    assert int((~mask1).sum()) == 32 and torch.equal(mask1, W1 != 0)
    # Recompute the Fisher from masked gradients, as the modifier does, and prune again.
    _, _, H2 = make_problem(n_b=n_b, B=B, seed=6, grad_mask=mask1.double())
    W2, mask2 = global_threshold_round(W1, H2, ~mask1, 0.75)
    assert int((~mask2).sum()) == 48
    assert torch.all(~mask2[~mask1])  # monotone: nothing re-opened
    assert torch.all(W2[mask2] != 0) and torch.all(W2[~mask2] == 0)


def test_prefix_counts_with_ties_agree_with_weights():
    W, _, H = make_problem(n_b=3, B=6, seed=7)
    W[0, [1, 4]] = 0.0  # unpruned zeros: zero loss increments, tied cumulative losses
    order, losses = cap_eliminate(W, H, torch.zeros_like(W, dtype=torch.bool))
    assert sorted(order[0, :2].tolist()) == [1, 4] and torch.all(losses[0, [1, 4]] == 0)
    prune = torch.zeros_like(W, dtype=torch.bool)
    prune[0, 4] = True  # a tie-break by index could pick the later-eliminated of the two
    prune[1, order[1, :3].long()] = True
    counts = prefix_counts(order, prune)
    assert counts.tolist() == [1, 3, 0]
    mask = prefix_mask(order, counts)
    W_new = cap_reconstruct(W, H, order, counts)
    assert torch.all(W_new[~mask] == 0)
    assert int((W_new[mask] == 0).sum()) == 1  # the tied zero left in block 0
    assert int((~mask).sum()) == int(prune.sum())
    torch.testing.assert_close(W_new[0], W[0])  # removing a zero weight changes nothing


def test_padding_is_a_shorter_block():
    B, d_last = 8, 5
    W, _, H = make_problem(n_b=3, B=B, seed=8)
    valid = torch.ones_like(W, dtype=torch.bool)
    valid[2, d_last:] = False
    # Padded coordinates: zero weight and zero gradient, i.e. decoupled with H = 1 / damp.
    W[2, d_last:] = 0
    H[2, d_last:, :] = 0
    H[2, :, d_last:] = 0
    H[2, d_last:, d_last:] = torch.eye(B - d_last, dtype=f64) * 100
    _, _, Hs = make_problem(n_b=1, B=d_last, seed=9)
    H[2, :d_last, :d_last] = Hs[0]
    none = torch.zeros_like(W, dtype=torch.bool)
    order, losses = cap_eliminate(W, H, none, valid=valid)
    assert sorted(order[2, : B - d_last].tolist()) == list(range(d_last, B))
    ref_order, ref_losses, _ = reference_greedy(W[2, :d_last], Hs[0])
    assert order[2, B - d_last :].tolist() == ref_order
    prune = torch.zeros_like(W, dtype=torch.bool)
    prune[2, order[2, B - d_last : B - d_last + 2].long()] = True
    counts = prefix_counts(order, prune, valid)
    assert counts.tolist() == [0, 0, B - d_last + 2]
    W_new = cap_reconstruct(W, H, order, counts)
    assert int((W_new[2, :d_last] == 0).sum()) == 2 and torch.all(W_new[2, d_last:] == 0)
    mask = prefix_mask(order, counts, valid)
    assert int((~mask).sum()) == 2 and torch.all(mask[~valid])  # padding never counts


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nm_exact_with_preexisting_zeros(n, m):
    n_b, B = 6, 16
    W, F, H = make_problem(n_b=n_b, B=B, seed=10, corr=0.5)
    g = torch.Generator().manual_seed(11)
    pruned = torch.zeros(n_b, B, dtype=torch.bool)
    for b in range(n_b):  # up to n zeros per group already there
        for grp in range(B // m):
            k = int(torch.randint(0, n + 1, (1,), generator=g))
            pruned[b, grp * m + torch.randperm(m, generator=g)[:k]] = True
    W = W.masked_fill(pruned, 0.0)
    W_new, mask = cap_nm_prune(W, H, pruned, n, m)
    assert torch.all((~mask).view(n_b, -1, m).sum(2) == n)
    assert torch.all(~mask[pruned])
    assert torch.all(W_new[~mask] == 0) and torch.all(W_new[mask] != 0)
    for b in range(n_b):  # the kept weights are the joint OBS update for the removed set
        v, _ = joint_obs(W[b], F[b], (~mask[b]).nonzero().squeeze(1).tolist())
        torch.testing.assert_close(W_new[b], v, rtol=1e-8, atol=1e-10)
    # A second call on an exact N:M result has nothing left to do.
    W2, mask2 = cap_nm_prune(W_new, H, ~mask, n, m)
    assert torch.equal(mask2, mask) and torch.equal(W2, W_new)


def test_nm_padding_groups_are_ignored():
    W, _, H = make_problem(n_b=2, B=8, seed=12)
    valid = torch.ones_like(W, dtype=torch.bool)
    valid[1, 4:] = False
    W[1, 4:] = 0
    W_new, mask = cap_nm_prune(W, H, torch.zeros_like(valid), 2, 4, valid=valid)
    assert (~mask).sum().item() == 2 * 3 and torch.all(mask[1, 4:])
    bad = valid.clone()
    bad[1, 5] = True
    with pytest.raises(ValueError, match="all valid or all padding"):
        cap_nm_prune(W, H, torch.zeros_like(valid), 2, 4, valid=bad)


def test_bad_inputs_raise():
    W, _, H = make_problem(n_b=2, B=4)
    none = torch.zeros_like(W, dtype=torch.bool)
    with pytest.raises(ValueError, match="expected W"):
        cap_eliminate(W, H[:, :3, :3], none)
    with pytest.raises(ValueError, match="B % m"):
        cap_nm_prune(W, H, none, 2, 3)
    with pytest.raises(ValueError, match="counts"):
        cap_reconstruct(W, H, torch.zeros_like(W, dtype=torch.long), torch.tensor([5, 0]))
    H_bad = H.clone()
    H_bad[1, 2, 3] = float("inf")
    with pytest.raises(NumericalError, match="inverse Fisher"):
        cap_eliminate(W, H_bad, none)
    W[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="weights"):
        cap_eliminate(W, H, none)
