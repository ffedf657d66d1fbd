"""Mask creation (exact counts, ties, global, block4, N:M) and parameter selection."""

import math

import pytest
import torch
from torch import nn

from sparseml.errors import RecipeError
from sparseml.masks import MaskSpec, check_groupable, create_masks, lowest_mask, parse_mask_type
from sparseml.params import select_params


def test_exact_counts_per_tensor_and_ties_by_index():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 5.0, 0.5])
    (keep,) = create_masks([scores], [0.5], MaskSpec(), False)
    assert keep.tolist() == [True, False, False, True, True, False]
    for s in (0.0, 0.1, 0.33, 0.9):
        x = torch.randn(7, 13)
        (k,) = create_masks([x], [s], MaskSpec(), False)
        assert int((~k).sum()) == round(s * x.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowest_mask_is_the_stable_sort(dtype):
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 300, (1,), generator=gen))
        x = torch.randint(0, 6, (n,), generator=gen).to(dtype)  # many ties
        if trial % 3 == 0:
            x[torch.rand(n, generator=gen) < 0.2] = -math.inf
        if trial % 5 == 0:
            x[torch.rand(n, generator=gen) < 0.1] = math.nan
        for sparsity in (0.0, 0.1, 0.5, 0.77, 1.0):
            got = lowest_mask(x, sparsity)
            k = max(min(round(n * sparsity), n), int(torch.isneginf(x).sum()))
            want = torch.ones(n, dtype=torch.bool)
            want[torch.argsort(x, stable=True)[:k]] = False
            assert torch.equal(got, want), (trial, sparsity)


def test_global_threshold_counts_across_tensors_and_requires_equal_targets():
    a, b = torch.arange(10.0), torch.arange(10.0, 30.0)
    ka, kb = create_masks([a, b], [0.5, 0.5], MaskSpec(), True)
    assert int((~ka).sum()) == 10 and int((~kb).sum()) == 5
    with pytest.raises(RecipeError, match="one target"):
        create_masks([a, b], [0.5, 0.6], MaskSpec(), True)


def test_masks_are_monotone_neg_inf_always_pruned():
    scores = torch.tensor([-math.inf, -math.inf, -math.inf, 1.0, 2.0, 3.0])
    (keep,) = create_masks([scores], [0.2], MaskSpec(), False)
    assert keep.tolist() == [False, False, False, True, True, True]


def test_block4_groups_consecutive_entries_along_rows():
    w = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0, 0.1, 0.1, 0.1, 0.1]]
    )
    (keep,) = create_masks([w], [0.5], parse_mask_type("block4"), False)
    assert keep.tolist() == [[False] * 4 + [True] * 4, [True] * 4 + [False] * 4]


@pytest.mark.parametrize("text, n, m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_nm_exactly_n_zeros_per_group(text, n, m):
    spec = parse_mask_type(text)
    w = torch.randn(6, 16)
    (keep,) = create_masks([w], [spec.sparsity], spec, False)
    groups = (~keep).reshape(-1, m).sum(1)
    assert groups.eq(n).all()
    # the pruned ones are the n smallest in each group
    g = w.reshape(-1, m)
    pruned = (~keep).reshape(-1, m)
    assert (
        g[pruned].reshape(-1, n).max(1).values <= g[~pruned].reshape(-1, m - n).min(1).values
    ).all()


def test_nm_literal_with_fields_and_errors():
    assert parse_mask_type("N:M", 2, 4) == MaskSpec("nm", 4, 2)
    with pytest.raises(RecipeError, match="needs the fields n and m"):
        parse_mask_type("N:M")
    with pytest.raises(RecipeError, match="0 < N < M"):
        parse_mask_type("4:4")
    with pytest.raises(RecipeError, match="not divisible"):
        check_groupable("fc.weight", torch.Size([3, 10]), MaskSpec("nm", 4, 2))
    check_groupable("conv.weight", torch.Size([8, 3, 2, 2]), MaskSpec("nm", 4, 2))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1))
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(4, 2)


def test_param_selection_regex_prefix_tokens_and_ddp_prefix():
    net = Net()
    names = lambda pats: [r.name for r in select_params(net, pats)]  # noqa: E731
    assert names(["re:.*weight"]) == [
        "blocks.0.weight",
        "blocks.1.weight",
        "blocks.2.weight",
        "conv.weight",
        "fc.weight",
    ]
    assert names(["__ALL_PRUNABLE__"]) == [
        "blocks.0.weight",
        "blocks.2.weight",
        "conv.weight",
        "fc.weight",
    ]
    assert len(names(["__all__"])) == len(list(net.parameters()))
    assert names(["re:fc.w"]) == ["fc.weight"]  # anchored at the start only
    assert names(["module.fc.weight"]) == ["fc.weight"]
    assert names(["re:module.blocks.0"]) == ["blocks.0.weight", "blocks.0.bias"]
    dp = nn.DataParallel(net)
    assert [r.name for r in select_params(dp, ["re:blocks.2.weight"])] == ["blocks.2.weight"]


def test_param_selection_strict_errors():
    with pytest.raises(RecipeError, match=r"\['re:.*missing'\] match no parameter"):
        select_params(Net(), ["fc.weight", "re:.*missing"], "GMPruningModifier")
    with pytest.raises(RecipeError, match="not a valid regex"):
        select_params(Net(), ["re:(("])
