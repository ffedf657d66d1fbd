"""Manager and mask lifecycle: timing, enforcement through optimizers/AMP, finalize, resume."""

import copy
import logging

import pytest
import torch
from torch import nn

from sparseml.errors import RecipeError
from sparseml.pytorch.optim import ScheduledModifierManager


@pytest.fixture(scope="module")
def timm_module():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "research"))
    from utils.compat import ensure_torchvision

    ensure_torchvision()
    import timm

    return timm


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def no_grad_hooks(param):
    return not param._backward_hooks and not getattr(param, "_post_accumulate_grad_hooks", None)


def weights(model):
    return [p for n, p in model.named_parameters() if n.endswith("weight")]


def sparsity(model):
    ws = weights(model)
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def train_steps(model, optimizer, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen)
        loss = model(x).pow(2).mean() + sum(w.abs().sum() for w in weights(model)) * 0
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


GM = """
pruning_modifiers:
  - !GMPruningModifier
    params: ["re:.*weight"]
    init_sparsity: 0.2
    final_sparsity: 0.8
    start_epoch: {start}
    end_epoch: 40
    update_frequency: 20
    inter_func: linear
    global_sparsity: {glob}
"""


def test_pruning_fires_at_first_step_of_epochs_0_20_40():
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(GM.format(start=0, glob="false"))
    opt = manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.01), steps_per_epoch=2)
    assert sparsity(model) == pytest.approx(0.2, abs=0.01)  # magnitude prunes at modify
    seen = {}
    gen = torch.Generator().manual_seed(0)
    for _ in range(2 * 45):
        epoch = opt.wrapped_epoch
        model(torch.randn(4, 16, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()
        seen[epoch] = round(sparsity(model), 3)
    assert seen[19.5] == pytest.approx(0.2, abs=0.01)
    assert seen[20.0] == pytest.approx(0.5, abs=0.01)  # pruned inside the step at epoch 20
    assert seen[39.5] == pytest.approx(0.5, abs=0.01)
    assert seen[40.0] == pytest.approx(0.8, abs=0.01)
    assert seen[44.5] == pytest.approx(0.8, abs=0.01)
    per_tensor = [float((w == 0).float().mean()) for w in weights(model)]
    assert all(s == pytest.approx(0.8, abs=0.01) for s in per_tensor)


def test_modifier_starting_later_prunes_at_its_first_step():
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(GM.format(start=1, glob="true"))
    opt = manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.01), steps_per_epoch=3)
    assert sparsity(model) == 0
    train_steps(model, opt, 3)
    assert sparsity(model) == 0
    train_steps(model, opt, 1)
    assert sparsity(model) == pytest.approx(0.2, abs=0.01)  # init_sparsity at start_epoch


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    ],
)
def test_pruned_weights_stay_exactly_zero_through_optimizers_and_autocast(make_opt):
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(GM.format(start=0, glob="true"))
    opt = manager.modify(model, make_opt(model.parameters()), steps_per_epoch=2)
    masks = [w == 0 for w in weights(model)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 16, generator=gen)).float().pow(2).mean()
        loss.backward()
        for w, m in zip(weights(model), masks):
            assert w.grad[m].abs().max() == 0  # gradient hook
        opt.step()
        opt.zero_grad()
        for w, m in zip(weights(model), masks):
            assert w[m].abs().max() == 0
    manager.finalize(model)
    for module in model:
        assert not module._forward_pre_hooks
    assert all(no_grad_hooks(w) for w in weights(model))
    before = [w.clone() for w in weights(model)]
    train_steps(model, opt, 1)  # after finalize nothing is enforced any more
    assert any((w != b).any() for w, b in zip(weights(model), before))


def test_one_shot_apply_prunes_to_final_and_removes_hooks():
    model = mlp()
    recipe = GM.format(start=0, glob="true").replace("init_sparsity: 0.2", "init_sparsity: 0.8")
    ScheduledModifierManager.from_yaml(recipe).apply(model)
    assert sparsity(model) == pytest.approx(0.8, abs=1e-3)
    assert all(no_grad_hooks(w) for w in weights(model))


def test_nm_and_block4_through_gm_modifier():
    model = mlp()
    recipe = """
modifiers:
  - !GMPruningModifier
    params: ["re:.*[24].weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 1
    mask_type: N:M
    n: 2
    m: 4
"""
    ScheduledModifierManager.from_yaml(recipe).apply(model)
    for w in (model[2].weight, model[4].weight):
        assert (w == 0).reshape(-1, 4).sum(1).eq(2).all()
    assert (model[0].weight != 0).all()
    model = mlp()
    ScheduledModifierManager.from_yaml(
        recipe.replace("mask_type: N:M\n    n: 2\n    m: 4", "mask_type: block4")
    ).apply(model)
    zeros = (model[2].weight == 0).reshape(-1, 4).sum(1)
    assert set(zeros.tolist()) <= {0, 4} and int(zeros.eq(4).sum()) == zeros.numel() // 2


def test_constant_pruning_freezes_existing_zeros_then_releases():
    model = mlp()
    ScheduledModifierManager.from_yaml(
        GM.format(start=0, glob="true").replace("init_sparsity: 0.2", "init_sparsity: 0.8")
    ).apply(model)
    zero = [w == 0 for w in weights(model)]
    manager = ScheduledModifierManager.from_yaml(
        "modifiers:\n  - !ConstantPruningModifier\n    params: ['re:.*weight']\n    start_epoch: 0\n    end_epoch: 2\n"
    )
    opt = manager.modify(
        model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1), steps_per_epoch=2
    )
    train_steps(model, opt, 4)
    assert all(w[z].abs().max() == 0 for w, z in zip(weights(model), zero))
    train_steps(model, opt, 2)  # the end update (epoch 2) removed the hooks
    assert any(w[z].abs().max() > 0 for w, z in zip(weights(model), zero))


def test_state_dict_resume_restores_masks_and_schedule():
    recipe = GM.format(start=0, glob="true")
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(recipe)
    opt = manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.05), steps_per_epoch=2)
    train_steps(model, opt, 2 * 21)  # through the pruning step at epoch 20
    state = copy.deepcopy(manager.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    masks = [w != 0 for w in weights(model)]
    # continue the original run
    train_steps(model, opt, 2 * 25, seed=7)
    final_original = [w.detach().clone() for w in weights(model)]

    resumed = mlp()
    resumed.load_state_dict(saved_model)
    with torch.no_grad():  # perturb zeros: restored masks, not the zero pattern, must decide
        resumed[0].weight.add_(1e-3)
    manager2 = ScheduledModifierManager.from_yaml(recipe)
    manager2.load_state_dict(state)  # before modify: no re-pruning at initialize
    opt2 = manager2.modify(
        resumed, torch.optim.SGD(resumed.parameters(), lr=0.05), steps_per_epoch=2, epoch=21
    )
    assert all(torch.equal(w != 0, m) for w, m in zip(weights(resumed), masks))
    assert manager2.pruning_modifiers[0].applied_sparsity == pytest.approx([0.5] * 3)
    resumed.load_state_dict(saved_model)
    train_steps(resumed, opt2, 2 * 25, seed=7)
    for a, b in zip(final_original, weights(resumed)):
        assert torch.allclose(a, b, atol=1e-6)
        assert torch.equal(a == 0, b == 0)
    with pytest.raises(RecipeError, match="does not match this recipe"):
        ScheduledModifierManager.from_yaml(recipe.replace("0.8", "0.9")).load_state_dict(state)


def test_wrapper_forwards_attributes_and_rejects_bad_steps_per_epoch():
    model = mlp()
    manager = ScheduledModifierManager.from_yaml(GM.format(start=0, glob="true"))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        manager.modify(model, inner, steps_per_epoch=0)
    opt = manager.modify(model, inner, steps_per_epoch=4)
    assert opt.param_groups is inner.param_groups and opt.wrapped_manager is manager
    opt.custom_flag = 3
    assert inner.custom_flag == 3
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.1


def test_timm_vit_and_ddp_names_with_cap_style_regex(timm_module):
    model = timm_module.create_model("test_vit", pretrained=False, num_classes=5)
    recipe = """
pruning_modifiers:
  - !GlobalMagnitudePruningModifier
    params: ["re:.*blocks.*.attn.qkv.weight", "re:.*blocks.*.mlp.fc1.weight"]
    init_sparsity: 0.6
    final_sparsity: 0.6
    start_epoch: 0
    end_epoch: 1
"""
    manager = ScheduledModifierManager.from_yaml(recipe)
    manager.apply(nn.DataParallel(model))
    pruned = [
        p for n, p in model.named_parameters() if ".attn.qkv.weight" in n or ".mlp.fc1.weight" in n
    ]
    total = sum(p.numel() for p in pruned)
    assert sum(int((p == 0).sum()) for p in pruned) == round(0.6 * total)


def test_nm_on_a_layer_whose_rows_do_not_tile_names_modifier_and_param():
    recipe = "modifiers:\n  - !GMPruningModifier\n    init_sparsity: 0.5\n    final_sparsity: 0.5\n"
    recipe += "    start_epoch: 0\n    end_epoch: 1\n    mask_type: '2:4'\n"
    with pytest.raises(
        RecipeError, match=r"GMPruningModifier.*mask_type.*weight.*not divisible by"
    ):
        ScheduledModifierManager.from_yaml(recipe).apply(nn.Linear(3, 2))


COARSE = """
modifiers:
  - !GMPruningModifier
    params: {params}
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 1
    mask_type: {mask}
    global_sparsity: {glob}
"""


@pytest.mark.parametrize(
    ("params", "mask", "glob", "warned"),
    [
        (
            "['tiny.weight']",
            "block4",
            "false",
            "final_sparsity 0.50 rounds to 0.00 on tiny.weight (1 block4 group of 4 entries)",
        ),
        ("['tiny.weight']", "unstructured", "false", None),  # 2 of 4 entries: exact
        ("['re:.*weight']", "block4", "false", "on tiny.weight (1 block4 group"),
        ("['re:.*weight']", "block4", "true", None),  # 1 + 64 groups: 0.49 of them
        ("['big.weight']", "block4", "false", None),
    ],
)
def test_targets_whole_groups_cannot_reach_are_warned(caplog, params, mask, glob, warned):
    """A selector prunes round(s x groups) groups: on a parameter of one block4 group a
    sparsity of 0.5 prunes nothing, and that is said once at initialize, naming the parameter."""
    model = nn.Module()
    model.tiny, model.big = nn.Linear(4, 1), nn.Linear(16, 16)
    recipe = COARSE.format(params=params, mask=mask, glob=glob)
    with caplog.at_level(logging.WARNING, logger="sparseml.pruning.targets"):
        ScheduledModifierManager.from_yaml(recipe).apply(model)
    said = [r.getMessage() for r in caplog.records if r.name == "sparseml.pruning.targets"]
    if warned is None:
        assert said == []
    else:
        assert len(said) == 1 and warned in said[0], said
        assert said[0].startswith("GMPruningModifier: ")
    if mask == "block4" and glob == "false" and "tiny" in params:
        assert bool((model.tiny.weight != 0).all())  # what the warning says: nothing pruned
