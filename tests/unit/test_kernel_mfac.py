"""Static M-FAC kernel against dense float64 inverses and the paper's sequential recursion."""

import pytest
import torch

from sparseml.errors import NumericalError
from sparseml.kernels.mfac import (
    MFACInverse,
    mfac_recursion_reference,
    recursion_diag,
    recursion_mul,
)

DAMP = 0.05


def dense_inverse(grads: torch.Tensor, damp: float, block: int | None = None) -> torch.Tensor:
    """Block-diagonal inverse of damp*I + G^T G / m, blocks of `block` consecutive coordinates."""
    grads = grads.double()
    m, d = grads.shape
    block = block or d
    out = torch.zeros(d, d, dtype=torch.float64)
    for a in range(0, d, block):
        b = min(a + block, d)
        g = grads[:, a:b]
        fisher = damp * torch.eye(b - a, dtype=torch.float64) + g.T @ g / m
        out[a:b, a:b] = torch.linalg.inv(fisher)
    return out


def make_grads(m: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # a shared mean direction makes the gradients correlated, as real ones are
    return (torch.randn(m, d, generator=gen) + torch.randn(1, d, generator=gen)).to(dtype)


CASES = [
    # (m, d, block_size, num_pages)
    (8, 50, None, 1),
    (8, 50, None, 3),
    (8, 50, 16, 1),  # B > m, partial last block (50 = 3*16 + 2)
    (8, 50, 16, 2),
    (8, 50, 8, 1),  # B == m uses the Z form
    (8, 50, 6, 1),  # B < m, explicit blocks, partial last block
    (8, 50, 6, 4),
    (8, 50, 200, 1),  # B > d: one block
    (1, 7, None, 1),
    (20, 3, None, 2),  # m > d
]


@pytest.mark.parametrize("m,d,block,pages", CASES)
def test_matches_dense_inverse(m, d, block, pages):
    grads = make_grads(m, d)
    oracle = dense_inverse(grads, DAMP, block)
    inv = MFACInverse.build(grads, DAMP, block_size=block, num_pages=pages)
    x = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scale = oracle.abs().max()
    assert torch.allclose(inv.diag(), oracle.diagonal(), rtol=0, atol=1e-10 * scale)
    assert torch.allclose(inv.mul(x), oracle @ x, rtol=0, atol=1e-10 * scale * x.abs().sum())
    assert inv.explicit == (block is not None and min(block, d) < m)


def test_paging_equals_unpaged_and_overwrite_consumes_grads():
    grads = make_grads(12, 101)
    x = torch.randn(101, dtype=torch.float64)
    ref = MFACInverse.build(grads, DAMP)
    work = grads.clone()
    paged = MFACInverse.build(work, DAMP, num_pages=5, overwrite=True)
    assert len(paged.chunks) == 5
    assert paged.chunks[0].data_ptr() == work.data_ptr()  # Z lives in the gradient storage
    assert not torch.equal(work, grads)
    torch.testing.assert_close(paged.diag(), ref.diag(), rtol=1e-12, atol=0)
    torch.testing.assert_close(paged.mul(x), ref.mul(x), rtol=1e-12, atol=1e-12)


def test_blas3_form_equals_sequential_recursion():
    grads = make_grads(16, 40, seed=3)
    vecs, den = mfac_recursion_reference(grads, DAMP)
    inv = MFACInverse.build(grads, DAMP)
    x = torch.randn(40, dtype=torch.float64)
    torch.testing.assert_close(inv.diag(), recursion_diag(vecs, den, DAMP), rtol=1e-10, atol=0)
    torch.testing.assert_close(inv.mul(x), recursion_mul(vecs, den, DAMP, x), rtol=1e-9, atol=1e-9)
    # and the recursion itself is the exact inverse
    torch.testing.assert_close(
        recursion_diag(vecs, den, DAMP), dense_inverse(grads, DAMP).diagonal(), rtol=1e-10, atol=0
    )


def test_float32_close_to_float64_oracle():
    grads = make_grads(32, 500, seed=4) * 0.1
    x = torch.randn(500, dtype=torch.float64)
    for block in (None, 100, 10):
        inv = MFACInverse.build(grads.float(), 1e-2, block_size=block)
        assert inv.diag().dtype == torch.float32
        want = dense_inverse(grads, 1e-2, block)
        rel = (inv.diag().double() - want.diagonal()).abs().max() / want.diagonal().abs().max()
        assert rel < 1e-4
        rel = (inv.mul(x.float()).double() - want @ x).abs().max() / (want @ x).abs().max()
        assert rel < 1e-4


def test_zero_gradient_coordinates_are_decoupled():
    grads = make_grads(6, 30)
    grads[:, [0, 17, 29]] = 0.0
    for block in (None, 8, 4):
        inv = MFACInverse.build(grads, DAMP, block_size=block)
        diag = inv.diag()
        assert torch.allclose(diag[[0, 17, 29]], torch.full((3,), 1 / DAMP, dtype=torch.float64))
        e = torch.zeros(30, dtype=torch.float64)
        e[17] = 1.0
        out = inv.mul(e)
        assert abs(out[17] - 1 / DAMP) < 1e-9 and out[torch.arange(30) != 17].abs().max() < 1e-9


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"damp": 0.0}, ValueError),
        ({"damp": -1.0}, ValueError),
        ({"damp": float("nan")}, ValueError),
        ({"damp": float("inf")}, ValueError),
        ({"block_size": 0}, ValueError),
        ({"block_size": 2.5}, ValueError),
        ({"num_pages": 0}, ValueError),
        ({"block_size": 4, "overwrite": True}, ValueError),
    ],
)
def test_bad_settings_raise(kwargs, error):
    args = {"damp": DAMP, **kwargs}
    with pytest.raises(error, match="M-FAC"):
        MFACInverse.build(make_grads(4, 10), **args)


def test_bad_tensors_raise():
    bad = make_grads(4, 10)
    bad[1, 3] = float("nan")
    with pytest.raises(NumericalError, match="NaN or Inf"):
        MFACInverse.build(bad, DAMP)
    with pytest.raises(NumericalError):
        mfac_recursion_reference(bad, DAMP)
    with pytest.raises(ValueError, match=r"shape \(m, d\)"):
        MFACInverse.build(torch.randn(10), DAMP)
    with pytest.raises(ValueError, match=r"shape \(m, d\)"):
        MFACInverse.build(torch.ones(3, 4, dtype=torch.int64), DAMP)
    inv = MFACInverse.build(make_grads(4, 10), DAMP)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        inv.mul(torch.ones(9, dtype=torch.float64))
