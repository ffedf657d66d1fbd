"""The manager answers schedule and mask questions: ``sparsity_status(epoch)`` and ``masks()``."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparseml.pytorch.optim import ScheduledModifierManager


def gm_recipe(start=1, end=4, freq=1, leave_enabled=True, init=0.2, final=0.8) -> str:
    return (
        "modifiers:\n  - !GMPruningModifier\n    params: __ALL_PRUNABLE__\n"
        f"    init_sparsity: {init}\n    final_sparsity: {final}\n    start_epoch: {start}\n"
        f"    end_epoch: {end}\n    update_frequency: {freq}\n"
        f"    leave_enabled: {str(leave_enabled).lower()}\n"
    )


def train(manager, epochs: int) -> nn.Module:
    """One optimizer step per epoch, so the modifiers see epochs 0, 1, ..., epochs - 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.01), steps_per_epoch=1)
    for _ in range(epochs):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model


def test_update_epochs_follow_start_frequency_and_end():
    manager = ScheduledModifierManager.from_yaml(gm_recipe(start=0, end=5, freq=2))
    updates = [e for e in range(8) if manager.sparsity_status(e)["update_epoch"]]
    assert updates == [0, 2, 4, 5]


def test_status_before_during_and_after_pruning():
    manager = ScheduledModifierManager.from_yaml(gm_recipe())
    assert manager.sparsity_status(0) == {"sparsity": 0.0, "update_epoch": False, "modifier": None}
    train(manager, 6)  # pruning ran from epoch 1 to its end at 4
    during = manager.sparsity_status(2)
    assert during["modifier"] == "GMPruningModifier" and during["update_epoch"]
    after = manager.sparsity_status(5)  # fine-tuning: masks still enforced
    assert after == {
        "sparsity": pytest.approx(0.8),
        "update_epoch": False,
        "modifier": "GMPruningModifier",
    }


def test_status_drops_to_zero_when_masks_are_released():
    manager = ScheduledModifierManager.from_yaml(gm_recipe(leave_enabled=False))
    train(manager, 6)
    assert manager.sparsity_status(5) == {"sparsity": 0.0, "update_epoch": False, "modifier": None}


def test_masks_are_the_enforced_zero_pattern():
    manager = ScheduledModifierManager.from_yaml(gm_recipe())
    assert manager.masks() == {}  # nothing selected before modify
    model = train(manager, 6)
    masks = manager.masks()
    params = dict(model.named_parameters())
    assert sorted(masks) == ["0.weight", "2.weight"]
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert not bool((params[name][~mask] != 0).any())  # pruned entries are zero
        assert 1.0 - mask.float().mean().item() == pytest.approx(0.8, abs=0.02)


def test_masks_of_one_parameter_under_two_modifiers_are_combined():
    def pruner(keep: list[bool]) -> SimpleNamespace:
        masks = {"w": torch.tensor(keep)}
        return SimpleNamespace(sparsification_types=("pruning",), named_masks=lambda: masks)

    first, second = pruner([True, True, False]), pruner([True, False, True])
    manager = ScheduledModifierManager([])
    manager._modifiers = [first, second]
    assert manager.masks()["w"].tolist() == [True, False, False]
    assert first.named_masks()["w"].tolist() == [True, True, False]  # modifiers' masks untouched
