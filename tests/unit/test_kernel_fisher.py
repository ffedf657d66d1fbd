"""Block Fisher inverse kernel against dense float64 oracles."""

from __future__ import annotations

import math

import pytest
import torch

from sparseml.errors import NumericalError
from sparseml.kernels.packed import SymBlocks
from sparseml.kernels.fisher import (
    BlockFisherBuilder,
    accumulate_block_gram,
    block_diag,
    block_fisher_inverse,
    block_matvec,
    from_blocks,
    invert_block_fisher,
    mspace_block_inverse,
    num_blocks,
    to_blocks,
)

F64 = torch.float64


def _grads(m: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Correlated coordinates, so that the blocks are far from diagonal.
    base = torch.randn(m, d, generator=gen, dtype=F64)
    return base + 0.5 * torch.roll(base, 1, dims=1)


def _dense_block_inverses(grads: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    """Oracle: inv(damp*I + G_b^T G_b / m) per block, embedded in padded (n_b, B, B)."""
    m, d = grads.shape
    n_b = math.ceil(d / block_size)
    out = torch.zeros(n_b, block_size, block_size, dtype=F64)
    for b in range(n_b):
        g = grads[:, b * block_size : (b + 1) * block_size]
        k = g.shape[1]
        out[b, :k, :k] = torch.linalg.inv(damp * torch.eye(k, dtype=F64) + g.T @ g / m)
        out[b, k:, k:] = torch.eye(block_size - k, dtype=F64) / damp
    return out


def _inverse64(grads: torch.Tensor, block_size: int, damp: float, **kw) -> torch.Tensor:
    n_b = num_blocks(grads.shape[1], block_size)
    gram = torch.zeros(n_b, block_size, block_size, dtype=F64)
    accumulate_block_gram(grads, block_size, out=gram)
    return invert_block_fisher(gram, grads.shape[0], damp, **kw)


@pytest.mark.parametrize(
    ("m", "d", "block_size"),
    [(5, 24, 8), (40, 24, 8), (30, 29, 8), (3, 7, 16), (12, 10, 1)],
    ids=["m<B", "m>B", "padded", "single-short-block", "B=1"],
)
def test_block_inverse_matches_dense_float64(m: int, d: int, block_size: int) -> None:
    grads, damp = _grads(m, d), 1e-2
    expected = _dense_block_inverses(grads, block_size, damp)
    got = _inverse64(grads, block_size, damp)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 / damp)


def test_float32_path_matches_dense() -> None:
    grads, damp = _grads(50, 45, seed=1), 1e-3
    expected = _dense_block_inverses(grads, 16, damp)
    got = block_fisher_inverse(grads.float(), 16, damp, chunk_size=7, gram_dtype=torch.float32)
    assert got.dtype == torch.float32
    err = (got.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-5


@pytest.mark.parametrize(("m", "d", "block_size"), [(5, 24, 8), (3, 29, 8), (20, 13, 4)])
def test_mspace_form_matches_dense(m: int, d: int, block_size: int) -> None:
    grads, damp = _grads(m, d, seed=9), 1e-2
    grads[:, 3] = 0  # a pruned coordinate: decoupled here too
    expected = _dense_block_inverses(grads, block_size, damp)
    got = mspace_block_inverse(grads, block_size, damp, dtype=F64, blocks_per_chunk=2)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 / damp)
    assert torch.count_nonzero(got[0, 3, :3]) == 0 and torch.count_nonzero(got[0, :3, 3]) == 0


def test_auto_mspace_stays_accurate_when_damp_is_below_float32_gram_precision() -> None:
    # m < B and damp ~ eps_32 * ||G^T G / m||: a float32 Gram loses the null space of F_b.
    grads, damp = _grads(16, 128, seed=10).float(), 1e-7
    expected = _dense_block_inverses(grads.double(), 64, damp)
    got = block_fisher_inverse(grads, 64, damp)  # auto: m < B -> m-space form
    assert isinstance(got, SymBlocks)  # float64 lower triangles: exact, float32-sized
    assert (got.full() - expected).abs().max() / expected.abs().max() < 1e-5
    with pytest.raises(ValueError, match="damp"):
        mspace_block_inverse(grads, 64, 0.0)


def test_zero_gradient_coordinates_are_decoupled() -> None:
    grads, damp = _grads(20, 21, seed=2), 1e-3
    dead = [0, 5, 9, 20]  # 20 is the only real coordinate of the last (padded) block
    grads[:, dead] = 0
    H = _inverse64(grads, 8, damp)
    for p in dead + list(range(21, 24)):  # plus the padding
        b, i = divmod(p, 8)
        row, col = H[b, i].clone(), H[b, :, i].clone()
        assert row[i].item() == pytest.approx(1 / damp, rel=1e-12)
        row[i] = col[i] = 0
        assert torch.count_nonzero(row) == 0 and torch.count_nonzero(col) == 0
    # the packed production path: off-diagonal entries stay exactly zero there too
    H32 = block_fisher_inverse(grads.float(), 8, damp).full()
    assert torch.count_nonzero(H32[0, 5, :5]) == 0 and torch.count_nonzero(H32[0, :5, 5]) == 0


def test_chunked_accumulation_equals_one_shot() -> None:
    grads = _grads(37, 50, seed=3)
    one = accumulate_block_gram(grads, 16, out=torch.zeros(4, 16, 16, dtype=F64))
    acc = torch.zeros(4, 16, 16, dtype=F64)
    for s in range(0, 37, 5):
        accumulate_block_gram(grads[s : s + 5], 16, out=acc)
    torch.testing.assert_close(acc, one, rtol=1e-12, atol=1e-12)
    sliced = torch.zeros(4, 16, 16, dtype=F64)
    accumulate_block_gram(grads, 16, out=sliced, blocks_per_chunk=1)
    torch.testing.assert_close(sliced, one, rtol=1e-12, atol=1e-12)
    # the Gram of block 1 is G_1^T G_1
    torch.testing.assert_close(one[1], grads[:, 16:32].T @ grads[:, 16:32])


def test_default_out_is_float32_zeros_plus_gram() -> None:
    grads = _grads(6, 10, seed=4).float()
    gram = accumulate_block_gram(grads, 4)
    assert gram.dtype == torch.float32 and gram.shape == (3, 4, 4)
    torch.testing.assert_close(gram[2, :2, :2], grads[:, 8:].T @ grads[:, 8:])
    assert torch.count_nonzero(gram[2, 2:]) == 0


def test_inversion_chunking_and_inplace_flag() -> None:
    grads, damp = _grads(9, 40, seed=5), 1e-2
    gram = accumulate_block_gram(grads, 8, out=torch.zeros(5, 8, 8, dtype=F64))
    before = gram.clone()
    H = invert_block_fisher(gram, 9, damp, blocks_per_chunk=2, inplace=False)
    assert torch.equal(gram, before) and H.data_ptr() != gram.data_ptr()
    H2 = invert_block_fisher(gram, 9, damp)
    assert H2.data_ptr() == gram.data_ptr()
    torch.testing.assert_close(H, H2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H, _dense_block_inverses(grads, 8, damp))
    # CPU LAPACK runs single-threaded inside; the caller's thread setting is restored
    threads = torch.get_num_threads()
    invert_block_fisher(gram.clone(), 9, damp, blocks_per_chunk=1)
    assert torch.get_num_threads() == threads


def test_block_helpers_match_dense_block_diagonal() -> None:
    grads, damp = _grads(10, 19, seed=6), 1e-1
    H = _inverse64(grads, 8, damp)
    dense = torch.block_diag(*H)[:19, :19]
    v = torch.randn(19, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(block_diag(H, 19), torch.diagonal(dense))
    torch.testing.assert_close(block_matvec(H, v), dense @ v)
    x = torch.arange(2 * 19.0).view(2, 19)
    assert to_blocks(x, 8).shape == (2, 3, 8)
    assert torch.equal(from_blocks(to_blocks(x, 8), 19), x)


@pytest.mark.parametrize("damp", [0.0, -1e-3, float("nan"), float("inf"), "1e-3"])
def test_bad_damp_raises_value_error(damp) -> None:
    gram = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="damp"):
        invert_block_fisher(gram, 4, damp)


@pytest.mark.parametrize("num_grads", [0, -3, 2.0, True])
def test_bad_num_grads_raises_value_error(num_grads) -> None:
    with pytest.raises(ValueError, match="num_grads"):
        invert_block_fisher(torch.zeros(2, 4, 4), num_grads, 1e-3)


@pytest.mark.parametrize("block_size", [0, -4, 2.5])
def test_bad_block_size_raises_value_error(block_size) -> None:
    with pytest.raises(ValueError, match="block_size"):
        num_blocks(10, block_size)
    with pytest.raises(ValueError, match="block_size"):
        accumulate_block_gram(torch.zeros(2, 10), block_size)


def test_wrong_out_shape_raises_value_error() -> None:
    with pytest.raises(ValueError, match="out must have shape"):
        accumulate_block_gram(torch.zeros(2, 10), 4, out=torch.zeros(2, 4, 4))


@pytest.mark.parametrize("mspace", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_names_the_block(bad: float, mspace: bool) -> None:
    grads = _grads(8, 40, seed=7).float()
    grads[3, 21] = bad  # coordinate 21 is in block 2 for B = 8
    with pytest.raises(NumericalError, match="block 2 .*NaN/Inf"):
        block_fisher_inverse(grads, 8, 1e-3, mspace=mspace)


def test_non_positive_definite_block_names_block_and_damp() -> None:
    gram = torch.zeros(4, 4, 4, dtype=F64)
    gram[3] = -2.0 * 1e-4 * 5 * torch.eye(4, dtype=F64)  # F_3 = damp*I - 2*damp*I
    with pytest.raises(NumericalError, match=r"block 3 .*larger damp"):
        invert_block_fisher(gram, 5, 1e-4, blocks_per_chunk=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gram_on_another_device_than_grads() -> None:
    grads = _grads(20, 50, seed=8).float()
    cpu = accumulate_block_gram(grads, 16)
    out = torch.zeros(4, 16, 16)
    accumulate_block_gram(grads.cuda(), 16, out=out, blocks_per_chunk=3)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, cpu, rtol=1e-4, atol=1e-4)
    H = block_fisher_inverse(grads.cuda(), 16, 1e-2)
    want = block_fisher_inverse(grads, 16, 1e-2).full()
    torch.testing.assert_close(H.cpu().full(), want, rtol=1e-4, atol=1e-3)


def test_mspace_builder_keeps_chunks_without_copying():
    # m < B: the samples are used where they are (a copy would double the peak memory)
    grads = torch.randn(6, 40, dtype=torch.float64)
    builder = BlockFisherBuilder(40, 16, 6, 1e-2, dtype=torch.float64)
    for s in (0, 3):
        builder.add(grads[s : s + 3])
    assert [g.data_ptr() for g in builder.store] == [grads[0:3].data_ptr(), grads[3:].data_ptr()]
    torch.testing.assert_close(
        builder.finish().full(), block_fisher_inverse(grads, 16, 1e-2).full()
    )
    # a narrow column slice of a wide chunk (another rank's share) is copied, not pinned
    wide = torch.randn(6, 400, dtype=torch.float64)
    builder = BlockFisherBuilder(40, 16, 6, 1e-2, dtype=torch.float64)
    builder.add(wide[:, :40])
    assert builder.store[0].data_ptr() != wide.data_ptr()
