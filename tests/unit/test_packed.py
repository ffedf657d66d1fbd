"""Packed symmetric blocks (float64 lower triangles) against the full blocks they stand for."""

from __future__ import annotations

import pytest
import torch

from sparseml.kernels.cap import cap_eliminate, cap_reconstruct
from sparseml.kernels.fisher import block_diag, block_matvec
from sparseml.kernels.fisher_build import block_fisher_inverse
from sparseml.kernels.obs import obs_group_scores, obs_prune_update, obs_scores
from sparseml.kernels.packed import SymBlocks, pack, packed_numel, unpack

F64 = torch.float64


def sym(n: int, B: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(n, B, B, dtype=F64, generator=torch.Generator().manual_seed(seed))
    s = a @ a.mT + B * torch.eye(B, dtype=F64)
    return (s + s.mT) / 2  # exactly symmetric (a GEMM's two triangles may differ in rounding)


@pytest.mark.parametrize("B", [1, 2, 7, 16])
def test_pack_unpack_roundtrip_and_indexing(B: int) -> None:
    full = sym(5, B)
    packed = SymBlocks(pack(full), B)
    assert packed.data.shape == (5, packed_numel(B)) and packed.nbytes == 5 * packed_numel(B) * 8
    assert packed.shape == full.shape and packed.dim() == 3 and len(packed) == 5
    assert torch.equal(packed.full(), full)
    assert torch.equal(packed[2], full[2])
    assert torch.equal(packed[1:4], full[1:4])
    assert torch.equal(packed[torch.tensor([4, 0])], full[[4, 0]])
    assert torch.equal(packed.diagonal(dim1=-2, dim2=-1), full.diagonal(dim1=-2, dim2=-1))
    wide = torch.zeros(2, B, B + 1, dtype=F64)
    packed.unpack_into(slice(3, 5), wide)
    assert torch.equal(wide[..., :B], full[3:5]) and torch.all(wide[..., B] == 0)
    # a transposed (non-contiguous) symmetric input packs to the same triangles
    assert torch.equal(pack(full.mT.contiguous().mT), pack(full))
    assert torch.equal(unpack(pack(full), B), full)


def test_write_and_rows() -> None:
    full = sym(6, 8)
    packed = SymBlocks.zeros(6, 8)
    packed.write(2, full[2:5])
    assert torch.equal(packed.rows(2, 3), full[2:5])
    assert torch.count_nonzero(packed.data[:2]) == 0 and torch.count_nonzero(packed.data[5]) == 0
    buf = torch.empty(4, 8, 8, dtype=F64)
    assert torch.equal(packed.rows(3, 4, out=buf), packed.full()[3:6])  # clipped at the end


def test_bad_storage_is_refused() -> None:
    with pytest.raises(ValueError, match="packed blocks must be"):
        SymBlocks(torch.zeros(2, 10, dtype=torch.float32), 4)


def test_kernels_give_the_same_results_on_packed_and_full_inverses() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(40, 100, generator=gen)
    H = block_fisher_inverse(grads, 16, 1e-2)
    assert isinstance(H, SymBlocks) and H.shape == (7, 16, 16)
    Hf = H.full()
    w = torch.randn(100, generator=gen)
    prune = torch.rand(100, generator=gen) < 0.4
    none = torch.zeros(100, dtype=torch.bool)
    assert torch.equal(block_diag(H, 100), block_diag(Hf, 100))
    assert torch.equal(block_matvec(H, w), block_matvec(Hf, w))
    assert torch.equal(obs_scores(w, H, none), obs_scores(w, Hf, none))
    assert torch.equal(obs_group_scores(w, H, none, 4), obs_group_scores(w, Hf, none, 4))
    assert torch.equal(obs_prune_update(w, H, prune), obs_prune_update(w, Hf, prune))
    W = torch.nn.functional.pad(w, (0, 12)).view(7, 16)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    (o1, l1), (o2, l2) = cap_eliminate(W, H, pruned), cap_eliminate(W, Hf, pruned)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    counts = torch.arange(7) * 2
    assert torch.equal(cap_reconstruct(W, H, o1, counts), cap_reconstruct(W, Hf, o1, counts))
