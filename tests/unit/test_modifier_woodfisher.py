"""Full WoodFisher against a dense oracle; scale_prune_update; recompute_num and poly spacing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparseml.errors import RecipeError
from sparseml.pruning.methods import OBSPruningModifier, WoodFisherPruningModifier
from sparseml.schedules import recomputation_targets
from table_grads import TableGrads, one_shot

M, DAMP = 24, 0.02


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def weights(model) -> list[torch.Tensor]:
    return [model[0].weight, model[2].weight]


def table(model, m: int = M, seed: int = 1) -> torch.Tensor:
    d = sum(w.numel() for w in weights(model))
    return 0.3 * torch.randn(m, d, generator=torch.Generator().manual_seed(seed))


def dense_woodfisher(model, grads: torch.Tensor, s: float) -> torch.Tensor:
    """Spec 7.2 with the explicit d x d inverse in float64: global scores w^2 / (2 H_qq),
    exactly round(s d) removed, summed single-weight updates."""
    w = torch.cat([p.detach().reshape(-1) for p in weights(model)]).double()
    g = grads.double()
    H = torch.linalg.inv(DAMP * torch.eye(w.numel(), dtype=torch.float64) + g.T @ g / len(g))
    scores = w.square() / (2 * H.diagonal())
    drop = torch.zeros_like(w, dtype=torch.bool)
    drop[torch.argsort(scores, stable=True)[: round(s * w.numel())]] = True
    new = w - H @ torch.where(drop, w / H.diagonal(), 0.0)
    return new.masked_fill(drop, 0.0)


FIELDS = {
    "params": '["re:.*weight"]',
    "init_sparsity": 0.5,
    "final_sparsity": 0.5,
    "num_grads": M,
    "damp": DAMP,
    "global_sparsity": "true",
}


def test_full_woodfisher_equals_the_dense_oracle(one_thread) -> None:
    model = mlp()
    grads = table(model)
    expected = dense_woodfisher(model, grads, 0.5)
    mod = one_shot(model, "WoodFisherPruningModifier", FIELDS, TableGrads(grads))
    got = torch.cat([p.detach().reshape(-1) for p in weights(model)]).double()
    assert torch.equal(got == 0, expected == 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert mod.applied_sparsity == [0.5, 0.5]
    assert "fisher_block_size" not in WoodFisherPruningModifier.fields  # full only


def run_scaled(tag: str, scale: float, extra: dict) -> list[torch.Tensor]:
    model = mlp()
    one_shot(model, tag, {**FIELDS, **extra, "scale_prune_update": scale}, TableGrads(table(model)))
    return [p.detach().clone() for p in weights(model)]


CASES = {
    "WoodFisherPruningModifier": {},
    "OBSPruningModifier": {"fisher_block_size": 8},
    "WoodTaylorPruningModifier": {},  # full, matrix-free
    "WoodTaylor-block": {"fisher_block_size": 8},
}


@pytest.mark.parametrize("case", list(CASES))
def test_scale_prune_update_scales_the_update(case: str, one_thread) -> None:
    tag = case if case.endswith("Modifier") else "WoodTaylorPruningModifier"
    dense = [p.detach().clone() for p in weights(mlp())]
    full = run_scaled(tag, 1.0, CASES[case])
    none = run_scaled(tag, 0.0, CASES[case])
    half = run_scaled(tag, 0.5, CASES[case])
    for d, f, n, h in zip(dense, full, none, half):
        keep = f != 0
        assert torch.equal(keep, n != 0) and torch.equal(keep, h != 0)  # same selection
        # 0: pure scoring, the kept weights are untouched (OBD); 0.5: half the change
        assert torch.equal(n, d * keep)
        torch.testing.assert_close(h, (d + 0.5 * (f - d)) * keep, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(f, n) for f, n in zip(full, none))  # the update is not empty


def test_recompute_num_is_the_woodfisher_count_of_extra_fisher_builds(one_thread) -> None:
    mod = WoodFisherPruningModifier(final_sparsity=0.5, recompute_num=2)
    assert mod.num_recomputations == 3  # the reference prunes R + 1 times
    assert OBSPruningModifier(final_sparsity=0.5, recompute_num=0).num_recomputations == 1
    with pytest.raises(RecipeError, match="not both"):
        WoodFisherPruningModifier(final_sparsity=0.5, recompute_num=1, num_recomputations=2)
    with pytest.raises(RecipeError, match=r"'recompute_num' = -1 must be an integer >= 0"):
        WoodFisherPruningModifier(final_sparsity=0.5, recompute_num=-1)


def test_poly_recomputation_spacing(monkeypatch, one_thread) -> None:
    # s_j = s_p + (s_t - s_p)(1 - (1 - j/R)^degree), the last one exactly the target (no W3)
    got = recomputation_targets(0.3, 0.9, 4, "poly", 2)
    expected = [0.3 + 0.6 * (1 - (1 - j / 4) ** 2) for j in range(1, 5)]
    assert got == pytest.approx(expected) and got[-1] == 0.9
    assert recomputation_targets(0.0, 0.8, 3, "poly", 1) == recomputation_targets(0.0, 0.8, 3)
    assert recomputation_targets(0.1, 0.8, 3, "poly", 3) == pytest.approx(
        recomputation_targets(0.1, 0.8, 3, "cubic")
    )
    with pytest.raises(RecipeError, match="recompute_degree"):
        WoodFisherPruningModifier(final_sparsity=0.5, recomputation_inter_func="poly")
    with pytest.raises(RecipeError, match="recompute_degree"):
        WoodFisherPruningModifier(final_sparsity=0.5, recompute_degree=2)

    seen = []

    def record(self, module, targets, timings):
        seen.append(targets[0])
        original_step(self, module, targets, timings)

    original_step = WoodFisherPruningModifier.prune_once
    monkeypatch.setattr(WoodFisherPruningModifier, "prune_once", record)
    model = mlp()
    fields = {**FIELDS, "init_sparsity": 0.6, "final_sparsity": 0.6, "recompute_num": 2}
    fields.update(recomputation_inter_func="poly", recompute_degree=2)
    mod = one_shot(model, "WoodFisherPruningModifier", fields, TableGrads(table(model)))
    assert seen == pytest.approx([0.6 * (1 - (1 - j / 3) ** 2) for j in (1, 2, 3)])
    assert sum(int((w == 0).sum()) for w in weights(model)) == round(0.6 * 45)
    assert mod.num_recomputations == 3


def test_flops_target_replaces_final_sparsity() -> None:
    with pytest.raises(RecipeError, match="final_sparsity.*flops_target"):
        WoodFisherPruningModifier(final_sparsity=0.5, flops_target=0.5)
    with pytest.raises(RecipeError, match="'final_sparsity' = None is required"):
        WoodFisherPruningModifier()
    with pytest.raises(RecipeError, match="'scale_prune_update' = 1.5 must be"):
        WoodFisherPruningModifier(final_sparsity=0.5, scale_prune_update=1.5)
    with pytest.raises(RecipeError, match="global_sparsity"):
        WoodFisherPruningModifier(final_sparsity=0.5, flops_power=1, global_sparsity=False)
    mod = WoodFisherPruningModifier(flops_target=0.4)
    assert mod.final_sparsity is None and copy.deepcopy(mod) == mod
