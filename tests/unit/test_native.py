"""The compiled CPU kernels (`sparseml.kernels.native`) against brute-force float64 oracles and
against the torch kernels they replace on CPU (which stay the accelerator path)."""

from __future__ import annotations

import pytest
import torch

from sparseml.errors import NumericalError
from sparseml.kernels import native
from sparseml.kernels.cap import cap_eliminate, cap_nm_prune, cap_reconstruct
from sparseml.kernels.fisher import accumulate_block_gram, invert_block_fisher
from sparseml.kernels.fisher_build import BlockFisherBuilder, block_fisher_inverse
from sparseml.kernels.obs import obs_loss, obs_prune_update
from sparseml.kernels.packed import SymBlocks, pack

f64 = torch.float64
pytestmark = pytest.mark.skipif(not native.ENABLED, reason="numba is not installed")


def both(fn, monkeypatch):
    """fn() with the compiled kernels, then with the torch ones."""
    out = fn()
    with monkeypatch.context() as m:
        m.setattr(native, "ENABLED", False)
        return out, fn()


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def spd_inverse(n_b, B, m, damp, seed=0):
    g = torch.randn(n_b, m, B, generator=torch.Generator().manual_seed(seed), dtype=f64)
    F = g.mT @ g / m + damp * torch.eye(B, dtype=f64)
    return F, torch.cholesky_inverse(torch.linalg.cholesky(F))  # not batched LU (see below)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [96, 100, 37])  # whole blocks, a padded last block, one short one
def test_gram_is_the_float64_gram(dtype, d, monkeypatch):
    B, c = 16, 9
    wide = torch.randn(c, d + 5, dtype=dtype)
    x = wide[:, 3 : 3 + d]  # rows that are slices of wider rows (unit stride, row stride d + 5)
    n_b = -(-d // B)

    def run():
        out = SymBlocks.zeros(n_b, B)
        accumulate_block_gram(x, B, out=out, blocks_per_chunk=2)
        return accumulate_block_gram(x, B, out=out).full()  # twice: it accumulates

    compiled, torch_path = both(run, monkeypatch)
    xp = torch.nn.functional.pad(x.double(), (0, n_b * B - d)).view(c, n_b, B).transpose(0, 1)
    oracle = 2 * xp.mT @ xp
    assert rel(compiled, oracle) < 1e-14
    assert rel(torch_path, oracle) < 1e-14


@pytest.mark.parametrize("damp", [1e-1, 1e-8])
@pytest.mark.parametrize("B", [1, 24, 25, 77, 192])  # the triangle's inverse: plain, split, odd
def test_inverse_is_the_float64_inverse(damp, B, monkeypatch):
    n_b, m = 7, B + 16
    g = torch.randn(n_b, m, B, dtype=f64, generator=torch.Generator().manual_seed(1))
    gram = g.mT @ g

    def run():
        return invert_block_fisher(SymBlocks(pack(gram), B), m, damp).full()

    compiled, torch_path = both(run, monkeypatch)
    # torch's batched LU (linalg.inv) is wrong for B >= 160 once torch.set_num_threads ran
    # (torch 2.13, MKL on this CPU; `for_each_chunk` runs it): the oracle inverts one by one
    F = gram / m + damp * torch.eye(B, dtype=f64)
    oracle = torch.stack([torch.linalg.inv(f) for f in F])
    assert rel(compiled, oracle) < 1e-12  # m > B: well conditioned at any damp
    assert rel(compiled, torch_path) < 1e-10


def test_inverse_reports_the_failing_block():
    B = 8
    gram = torch.eye(B, dtype=f64).repeat(5, 1, 1)
    gram[3, 2, 2] = -50.0  # not a Gram: indefinite even after the damp
    with pytest.raises(NumericalError, match=r"Fisher block 3 .*leading minor 3"):
        invert_block_fisher(SymBlocks(pack(gram), B), 1, 1e-2, blocks_per_chunk=2)
    gram[3, 2, 2] = float("nan")
    with pytest.raises(NumericalError, match="Fisher block 3 has NaN/Inf"):
        invert_block_fisher(SymBlocks(pack(gram), B), 1, 1e-2)


def test_builder_matches_the_torch_path_at_small_damp(monkeypatch):
    grads = torch.randn(48, 5 * 32 + 7)

    def run():
        return block_fisher_inverse(grads, 32, 1e-8, chunk_size=16).full()

    compiled, torch_path = both(run, monkeypatch)
    assert rel(compiled, torch_path) < 1e-6  # conditioning ~1e8: rounding of two float64 paths


@pytest.mark.parametrize("chunks", [[40], [16, 16, 8], [16, 24]])  # the last one: in the inverse
def test_builder_writes_its_first_chunk_and_inverts_with_its_last(chunks, monkeypatch):
    B, d, m = 32, 3 * 32 + 7, sum(chunks)
    wide = torch.randn(m, d + 5, dtype=f64, generator=torch.Generator().manual_seed(15))
    grads = wide[:, 2 : 2 + d]  # rows that are slices of wider rows

    def run():
        builder = BlockFisherBuilder(d, B, m, 1e-3)
        builder.store.data.fill_(float("nan"))  # what empty memory may hold: never read
        start = 0
        for c in chunks:
            builder.add(grads[start : start + c])
            start += c
        return builder.finish().full()

    compiled, torch_path = both(run, monkeypatch)
    g = torch.nn.functional.pad(grads, (0, 4 * B - d)).view(m, 4, B).transpose(0, 1)
    F = g.mT @ g / m + 1e-3 * torch.eye(B, dtype=f64)
    oracle = torch.stack([torch.linalg.inv(f) for f in F])
    assert rel(compiled, oracle) < 1e-12 and rel(torch_path, oracle) < 1e-12


def test_an_empty_chunk_adds_nothing_with_a_padded_last_block(monkeypatch):
    d, B = 3 * 16 + 5, 16
    grads = torch.randn(20, d, dtype=f64, generator=torch.Generator().manual_seed(17))

    def run():
        builder = BlockFisherBuilder(d, B, 20, 1e-2)
        builder.add(grads[:0])  # first: the fresh store must still become zeros
        builder.add(grads[:12])
        builder.add(grads[12:12])
        builder.add(grads[12:])
        return builder.finish().full()

    compiled, torch_path = both(run, monkeypatch)
    want = block_fisher_inverse(grads, B, 1e-2).full()
    assert rel(compiled, want) < 1e-12 and rel(torch_path, want) < 1e-12


def test_builder_refuses_samples_past_a_held_chunk_and_names_a_nan_block():
    B, d = 16, 64
    grads = torch.randn(24, d, dtype=f64, generator=torch.Generator().manual_seed(16))
    builder = BlockFisherBuilder(d, B, 16, 1e-2)  # announced 16: the chunk of 16 is held
    builder.add(grads[:16])
    with pytest.raises(RuntimeError, match="more than num_grads=16"):  # it could be stale
        builder.add(grads[16:])
    F = grads[:16].view(16, 4, B).transpose(0, 1)
    F = F.mT @ F / 16 + 1e-2 * torch.eye(B, dtype=f64)
    assert rel(builder.finish().full(), torch.stack([torch.linalg.inv(f) for f in F])) < 1e-12
    bad = grads.clone()
    bad[20, 2 * B + 3] = float("nan")  # in the last chunk, block 2
    builder = BlockFisherBuilder(d, B, 24, 1e-2)
    builder.add(bad[:16])
    builder.add(bad[16:])
    with pytest.raises(NumericalError, match="Fisher block 2 has NaN/Inf"):
        builder.finish()


def reference_greedy(w, h, closed=None):
    """Plain float64 loop: pivot argmin w^2 / h_jj (lowest index on ties), OBS update and
    Schur downdate; ``closed(elim, p)`` may forbid coordinates (N:M)."""
    w, h = w.clone(), h.clone()
    B = w.numel()
    elim = torch.zeros(B, dtype=torch.bool)
    order, scores = [], []
    for _ in range(B):
        s = w * w / h.diagonal()
        s[elim] = float("inf")
        if closed is not None:
            s[closed(elim)] = float("inf")
        if torch.isinf(s).all():
            break
        p = int(s.argmin())
        order.append(p)
        scores.append(float(s[p]))
        w = w - w[p] / h[p, p] * h[:, p]
        h = h - torch.outer(h[:, p], h[p, :]) / h[p, p]
        elim[p] = True
        w[elim] = 0
    return order, scores, w


def as_given(H, packed: bool):
    """H as full float64 blocks (the compiled greedy on [H | w] batches) or packed (the compiled
    greedy reading the triangles itself)."""
    return SymBlocks(pack(H), H.shape[-1]) if packed else H


@pytest.mark.parametrize("packed", [False, True])
def test_greedy_is_the_reference_loop(packed, monkeypatch):
    n_b, B = 6, 20
    _, H = spd_inverse(n_b, B, 30, 1e-3)
    H = as_given(H, packed)
    W = torch.randn(n_b, B, dtype=f64, generator=torch.Generator().manual_seed(2))
    pruned = torch.zeros(n_b, B, dtype=torch.bool)

    def run():
        return cap_eliminate(W, H, pruned, per_step=True, blocks_per_batch=4)

    (order, inc), (order_t, inc_t) = both(run, monkeypatch)
    assert torch.equal(order.long(), order_t.long())
    assert rel(inc, inc_t) < 1e-6  # float32 losses
    for b in range(n_b):
        ref_order, ref_scores, _ = reference_greedy(W[b], H[b])  # H[b]: a full block
        assert order[b].tolist() == ref_order
        got = inc[b, order[b].long()].double()
        assert rel(got, 0.5 * torch.tensor(ref_scores, dtype=f64)) < 1e-6


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 6)])
def test_nm_greedy_is_the_reference_loop(n, m, packed, monkeypatch):
    n_b, B = 4, 24
    _, H = spd_inverse(n_b, B, 30, 1e-2, seed=3)
    H = as_given(H, packed)
    W = torch.randn(n_b, B, dtype=f64, generator=torch.Generator().manual_seed(4))
    pruned = torch.zeros(n_b, B, dtype=torch.bool)
    pruned[1, m] = True  # one group starts with a removed weight

    def run():
        return cap_nm_prune(W, H, pruned, n, m)

    (w_new, keep), (w_t, keep_t) = both(run, monkeypatch)
    assert torch.equal(keep, keep_t)
    assert rel(w_new, w_t) < 1e-10
    assert bool(((~keep).view(n_b, -1, m).sum(2) == n).all())
    b = 0  # no earlier removals: the plain loop with groups closing at n removed
    _, _, w_ref = reference_greedy(
        W[b], H[b], lambda elim: elim.view(-1, m).sum(1).repeat_interleave(m) >= n
    )
    assert rel(w_new[b], w_ref) < 1e-10


@pytest.mark.parametrize("packed", [False, True])
def test_greedy_with_coupled_pre_eliminated_and_padding(packed, monkeypatch):
    n_b, B = 5, 16
    _, H = spd_inverse(n_b, B, 24, 1e-2, seed=5)
    H = as_given(H, packed)
    W = torch.randn(n_b, B, dtype=f64, generator=torch.Generator().manual_seed(6))
    pruned = torch.rand(n_b, B, generator=torch.Generator().manual_seed(7)) < 0.3
    valid = torch.ones(n_b, B, dtype=torch.bool)
    valid[-1, 11:] = False

    def run():
        return cap_eliminate(W, H, pruned, valid=valid, blocks_per_batch=2)

    (order, losses), (order_t, losses_t) = both(run, monkeypatch)
    assert torch.equal(order.long(), order_t.long())
    assert rel(losses, losses_t) < 1e-6


def test_packed_greedy_rejects_non_finite_blocks():
    B = 8
    H = torch.eye(B, dtype=f64).repeat(4, 1, 1)
    H[2, 5, 1] = H[2, 1, 5] = float("inf")
    with pytest.raises(NumericalError, match="NaN/Inf in the inverse Fisher"):
        cap_eliminate(torch.ones(4, B), as_given(H, True), torch.zeros(4, B, dtype=torch.bool))


@pytest.mark.parametrize("damp", [1e-2, 1e-7])
def test_reconstruction_and_obs_update_on_packed_blocks(damp, monkeypatch):
    n_b, B = 9, 16
    F, H = spd_inverse(n_b, B, 10, damp, seed=8)  # m < B: low rank, ill-conditioned at 1e-7
    packed = SymBlocks(pack(H), B)
    W = torch.randn(n_b, B, dtype=f64, generator=torch.Generator().manual_seed(9))
    order, _ = cap_eliminate(W, H, torch.zeros(n_b, B, dtype=torch.bool))
    counts = torch.tensor([0, 1, 5, 8, 15, 16, 3, 12, 7])
    prune = torch.rand(n_b * B, generator=torch.Generator().manual_seed(10)) < 0.5

    def run():
        return (
            cap_reconstruct(W, packed, order, counts),
            obs_prune_update(W.flatten(), packed, prune),
            obs_loss(W.flatten(), packed, prune),
        )

    (rec, upd, loss), (rec_t, upd_t, loss_t) = both(run, monkeypatch)
    tol = 1e-12 if damp > 1e-3 else 1e-6
    assert rel(rec, rec_t) < tol and rel(upd, upd_t) < tol
    assert abs(loss - loss_t) <= tol * abs(loss_t)
    for b in range(n_b if damp > 1e-3 else 0):  # the joint OBS solution, from F (which the
        # oracle can only solve accurately when it is well conditioned)
        S = order[b, : counts[b]].long()
        keep = torch.ones(B, dtype=torch.bool)
        keep[S] = False
        v = torch.zeros(B, dtype=f64)
        if keep.any():
            rhs = F[b][keep][:, S] @ W[b][S]
            v[keep] = W[b][keep] + torch.linalg.solve(F[b][keep][:, keep], rhs)
        assert rel(rec[b], v) < 1e-9
    assert bool((rec.gather(1, order.long()) * (torch.arange(B) < counts[:, None]) == 0).all())


def test_reconstruction_falls_back_when_h_ss_is_indefinite(monkeypatch):
    B = 8
    H = torch.eye(B, dtype=f64).repeat(3, 1, 1)
    H[1, 0, 1] = H[1, 1, 0] = 2.0  # H_SS indefinite for S = {0, 1}: Cholesky fails, LU solves
    W = torch.arange(3 * B, dtype=f64).view(3, B) + 1
    order = torch.arange(B).repeat(3, 1)
    counts = torch.tensor([2, 2, 0])

    def run():
        return cap_reconstruct(W, SymBlocks(pack(H), B), order, counts)

    compiled, torch_path = both(run, monkeypatch)
    assert torch.equal(compiled, torch_path)
    y = torch.linalg.solve(H[1][:2, :2], W[1][:2])
    assert rel(compiled[1], (W[1] - H[1][:, :2] @ y) * (torch.arange(B) >= 2)) < 1e-12


def test_lu_fallback_is_right_where_torchs_batched_lu_is_not():
    """torch 2.13's batched LU (MKL) returns wrong solutions for n >= 160 after an explicit
    torch.set_num_threads(>1) on this machine; the reconstruction's LU fallback runs inside
    `for_each_chunk` on one thread, where it is right."""
    B, n_b = 192, 2
    F, H = spd_inverse(n_b, B, B + 16, 1e-1, seed=13)
    H[0, 0, 1] = H[0, 1, 0] = 5 * H[0].diagonal()[:2].max()  # H_SS indefinite: LU solves it
    W = torch.randn(n_b, B, dtype=f64, generator=torch.Generator().manual_seed(14))
    order, counts = torch.arange(B).repeat(n_b, 1), torch.tensor([170, 0])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = cap_reconstruct(W, SymBlocks(pack(H), B), order, counts)
    finally:
        torch.set_num_threads(threads)
    S = torch.arange(170)
    y = torch.linalg.solve(H[0][S][:, S], W[0][S])  # one matrix: not affected
    want = (W[0] - H[0][:, S] @ y) * (torch.arange(B) >= 170)
    assert rel(got[0], want) < 1e-9 and torch.equal(got[1], W[1])


def test_results_do_not_depend_on_the_thread_count():
    n_b, B = 12, 24
    _, H = spd_inverse(n_b, B, 40, 1e-3, seed=11)
    W = torch.randn(n_b, B, dtype=f64, generator=torch.Generator().manual_seed(12))
    grads = torch.randn(50, n_b * B, generator=torch.Generator().manual_seed(13))
    threads = torch.get_num_threads()
    results = []
    for t in (1, 2):
        torch.set_num_threads(t)
        try:
            Hp = block_fisher_inverse(grads, B, 1e-3, chunk_size=20)
            order, losses = cap_eliminate(W, H, torch.zeros(n_b, B, dtype=torch.bool))
            counts = torch.full((n_b,), 10)
            results.append((Hp.data, order, losses, cap_reconstruct(W, Hp, order, counts)))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_blocks_raise_clear_errors():
    """Found by review: LAPACK's Cholesky lets a NaN through (OBS now raises as the torch path
    does), and a singular H on already-pruned coupled coordinates is a NumericalError."""
    B = 8
    _, H = spd_inverse(3, B, 20, 1e-2, seed=14)
    H[1, 1, 2] = H[1, 2, 1] = float("nan")
    prune = torch.zeros(3 * B, dtype=torch.bool)
    prune[B : B + 3] = True  # block 1, coordinates 0-2
    for fn in (obs_prune_update, obs_loss):
        with pytest.raises(NumericalError, match="Fisher block 1 is not positive definite"):
            fn(torch.ones(3 * B, dtype=f64), SymBlocks(pack(H), B), prune)
    _, H = spd_inverse(1, 4, 10, 0.1, seed=0)
    H[0, 0, 0] = 0.0  # coupled to the rest, no pivot
    pruned = torch.tensor([[True, False, False, False]])
    with pytest.raises(NumericalError, match="block 0 is singular on its already-pruned"):
        cap_eliminate(torch.ones(1, 4, dtype=f64), SymBlocks(pack(H), 4), pruned)


def test_views_and_empty_chunks_take_the_compiled_path_safely(monkeypatch):
    """Found by review: non-contiguous masks and packed storage, and an empty chunk."""
    n_b, B = 3, 4
    _, H = spd_inverse(n_b, B, 12, 1e-2, seed=15)
    wide = torch.zeros(n_b, 2 * pack(H).shape[1], dtype=f64)
    wide[:, ::2] = pack(H)
    sliced = SymBlocks(wide[:, ::2], B)  # a strided view of packed rows
    W = torch.randn(n_b, B, dtype=f64, generator=torch.Generator().manual_seed(16))
    pruned = torch.zeros(1, B, dtype=torch.bool).expand(n_b, B)  # stride 0

    def run():
        order, _ = cap_eliminate(W, sliced, pruned)
        w_nm, keep = cap_nm_prune(W, sliced, pruned.mT.contiguous().mT, 2, 4)
        return order, keep, w_nm

    (o, k, w), (o_t, k_t, w_t) = both(run, monkeypatch)
    assert torch.equal(o, o_t) and torch.equal(k, k_t) and rel(w, w_t) < 1e-12
    out = SymBlocks.zeros(2, 4)
    accumulate_block_gram(torch.zeros(0, 8), 4, out=out)
    assert not out.data.any()
