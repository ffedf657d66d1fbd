"""MACs counting (sparseml.flops) and the FLOPs-aware OBS family: flops_power, flops_target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseml.errors import RecipeError
from sparseml.flops import dense_macs, kept_macs, macs_per_weight
from sparseml.params import ParamRef, select_params
from sparseml.pytorch.optim import ScheduledModifierManager
from table_grads import TableGrads, one_shot


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # 8x8 outputs: 64 MACs per weight
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),  # 4x4 outputs: 16
        nn.Flatten(),
        nn.Linear(64, 5),  # 1
    )


BATCH = ([torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))], {}, None)
SIZES = [72, 144, 320]
PER_WEIGHT = [64, 16, 1]
DENSE = 72 * 64 + 144 * 16 + 320  # hand count: Cout Cin kh kw H_out W_out per layer


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.shared = nn.Linear(3, 3)

    def forward(self, x):
        return self.shared(self.shared(self.fc(x)))  # called twice: counted twice


def test_macs_per_weight_hand_counted() -> None:
    model = convnet()
    refs = select_params(model, ["re:.*weight"], "test")
    got = macs_per_weight(model, refs, *BATCH[:2])  # a batch of 3: counted per sample
    assert got == PER_WEIGHT
    assert dense_macs(got, [r.param.numel() for r in refs]) == DENSE == 7232
    masks = [torch.ones_like(r.param, dtype=torch.bool) for r in refs]
    masks[0].view(-1)[:10] = False
    assert kept_macs(got, masks) == DENSE - 640
    tokens = Tokens()
    refs = select_params(tokens, ["re:.*weight", "fc.bias"], "test")
    assert macs_per_weight(tokens, refs, (torch.randn(2, 5, 6),)) == [
        5,
        5,
        10,
    ]  # fc.weight, fc.bias, shared.weight
    with pytest.raises(RecipeError, match="emb.weight belongs to a Embedding"):
        emb = nn.Module()
        emb.emb = nn.Embedding(4, 2)
        macs_per_weight(emb, [ParamRef("emb.weight", emb.emb, "weight")], (torch.tensor([1]),))


def table(seed: int = 1, m: int = 16) -> torch.Tensor:
    return 0.1 * torch.randn(m, sum(SIZES), generator=torch.Generator().manual_seed(seed))


FIELDS = {"params": '["re:.*weight"]', "num_grads": 16, "damp": 0.01, "global_sparsity": "true"}
CASES = [
    ("OBSPruningModifier", {"fisher_block_size": 8}),
    ("CAPruningModifier", {"fisher_block_size": 8}),
    ("WoodFisherPruningModifier", {}),
    ("WoodTaylorPruningModifier", {"fisher_block_size": 8}),
]


@pytest.mark.parametrize("tag,extra", CASES, ids=[c[0] for c in CASES])
def test_flops_target_is_reached_within_one_weight(tag, extra, one_thread) -> None:
    model = convnet()
    mod = one_shot(model, tag, {**FIELDS, **extra, "flops_target": 0.4}, TableGrads(table(), BATCH))
    kept = kept_macs(PER_WEIGHT, [l.weight != 0 for l in (model[0], model[2], model[4])])
    goal = 0.4 * DENSE
    assert goal - max(PER_WEIGHT) < kept <= goal
    assert mod.flops_reached == pytest.approx(kept / DENSE)
    zeros = [float((l.weight == 0).float().mean()) for l in (model[0], model[2], model[4])]
    assert mod.applied_sparsity == pytest.approx(zeros)

    # path independence: the same prune set as a plain sparsity target of that
    # size, with the update applied once, gives the same weights
    pruned = sum(int((l.weight == 0).sum()) for l in (model[0], model[2], model[4]))
    again = convnet()
    s = pruned / sum(SIZES)
    one_shot(
        again,
        tag,
        {**FIELDS, **extra, "init_sparsity": s, "final_sparsity": s},
        TableGrads(table(), BATCH),
    )
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_flops_power_prunes_costly_layers_first(one_thread) -> None:
    model = convnet()
    mod = one_shot(
        model,
        "OBSPruningModifier",
        {**FIELDS, "fisher_block_size": 8, "final_sparsity": 0.3, "flops_power": 1.0},
        TableGrads(table(), BATCH),
    )
    assert mod.flops.costs == PER_WEIGHT
    # equal raw scores: score / MACs-per-weight ranks the 64-MAC layer lowest
    ones = [torch.ones_like(r.param) for r in mod.refs]
    mod.enforcer.set_masks([o > 0 for o in ones])  # as before the step: nothing pruned
    masks = mod.selector().select(mod.masked_scores(ones), [72 / 536] * 3)
    assert [int((~m).sum()) for m in masks] == [72, 0, 0]
    base = convnet()
    one_shot(
        base,
        "OBSPruningModifier",
        {**FIELDS, "fisher_block_size": 8, "final_sparsity": 0.3},
        TableGrads(table(), BATCH),
    )
    assert (model[0].weight == 0).sum() > (base[0].weight == 0).sum()


def test_gradual_flops_schedule_interpolates_the_macs(one_thread) -> None:
    text = """
pruning_modifiers:
  - !OBSPruningModifier
    params: ["re:.*weight"]
    flops_target: 0.3
    start_epoch: 0
    end_epoch: 2
    update_frequency: 1
    inter_func: linear
    num_grads: 16
    damp: 0.01
    fisher_block_size: 8
"""
    model = convnet()
    manager = ScheduledModifierManager.from_yaml(text)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    wrapped = manager.modify(model, opt, steps_per_epoch=2, grad_sampler=TableGrads(table(), BATCH))
    mod = manager.modifiers[0]
    reached = []
    for step in range(5):  # epochs 0, 0.5, ..., 2: pruning at 0, 1 and 2
        model(BATCH[0][0]).square().mean().backward()
        wrapped.step()
        wrapped.zero_grad()
        if step % 2 == 0:
            reached.append(mod.flops_reached)
    goals = [1.0, 0.65, 0.3]  # linear in MACs from 1 (start) to the target
    for got, goal in zip(reached, goals):
        assert goal - max(PER_WEIGHT) / DENSE < got <= goal + 1e-12
    state = mod.state_dict()
    assert state["flops_start"] == 0.0 and state["flops_reached"] == reached[-1]
