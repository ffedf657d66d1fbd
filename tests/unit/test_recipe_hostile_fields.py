"""Recipe values that passed the checks and then failed during training (or did something else
than written) are refused when the recipe loads or is applied, with a one-line RecipeError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseml.errors import RecipeError
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.recipe import load_modifiers

EPOCHS = "  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 4\n"


def recipe(modifier: str) -> str:
    return "modifiers:\n" + EPOCHS + modifier


def lr_recipe(lr_class: str, kwargs: str) -> str:
    return recipe(
        f"  - !LearningRateModifier\n    start_epoch: 0\n    end_epoch: 4\n    init_lr: 0.1\n"
        f"    lr_class: {lr_class}\n    lr_kwargs: {kwargs}\n"
    )


def lrs_over(manager: ScheduledModifierManager, epochs: int, steps: int = 2) -> list[float]:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapped = manager.modify(model, optimizer, steps_per_epoch=steps)
    out = []
    for epoch in range(epochs):
        for _ in range(steps):
            model(torch.ones(1, 2)).sum().backward()
            wrapped.step()
        out.append(optimizer.param_groups[0]["lr"])
        del epoch
    return out


@pytest.mark.parametrize(
    ("lr_class", "kwargs", "expected"),
    [
        ("StepLR", "{step_size: 1, gamma: 1e-1}", [0.01, 0.001]),
        ("ExponentialLR", "{gamma: 5e-1}", [0.05, 0.025]),
        ("MultiStepLR", "{milestones: [1e0, 2], gamma: 1e-1}", [0.01, 0.001]),
    ],
)
def test_lr_kwargs_in_exponent_notation_are_numbers(lr_class, kwargs, expected):
    """YAML 1.1 reads `1e-1` as a string: the checked number is what the scheduler gets."""
    manager = ScheduledModifierManager.from_yaml(lr_recipe(lr_class, kwargs))
    lrs = lrs_over(manager, 3)
    assert lrs[1:] == pytest.approx(expected)


def test_cosine_restarts_t_mult_in_exponent_notation():
    manager = ScheduledModifierManager.from_yaml(
        lr_recipe("CosineAnnealingWarmRestarts", "{T_0: 1, T_mult: 2e0}")
    )
    assert isinstance(manager.learning_rate_modifiers[0].lr_kwargs["T_mult"], int)
    assert all(0.0 <= lr <= 0.1 for lr in lrs_over(manager, 3))


def test_lr_class_that_is_not_a_name():
    for bad in ("[StepLR]", "{StepLR: 1}"):
        with pytest.raises(RecipeError, match="lr_class.*must be one of"):
            load_modifiers(lr_recipe(bad, "{step_size: 1}"))


@pytest.mark.parametrize("key", ["on", "1", "~", "true"])
def test_field_names_that_yaml_reads_as_other_types(key):
    text = recipe("  - !SetLearningRateModifier\n    start_epoch: 0\n    learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match="field name .* not a name; fields of"):
        load_modifiers(text + f"    {key}: 2\n")


def test_param_groups_out_of_range_are_refused_before_training():
    text = recipe(
        "  - !SetLearningRateModifier\n    start_epoch: 1\n    learning_rate: 0.01\n"
        "    param_groups: [7]\n"
    )
    manager = ScheduledModifierManager.from_yaml(text)
    model = nn.Linear(2, 1)
    with pytest.raises(RecipeError, match=r"param_groups.*\[7\].*1 param groups"):
        manager.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1)
    negative = ScheduledModifierManager.from_yaml(text.replace("[7]", "[-1]"))
    with pytest.raises(RecipeError, match="param_groups"):
        negative.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1)
    fine = ScheduledModifierManager.from_yaml(text.replace("[7]", "[0]"))
    fine.modify(model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ("lr_func: exponential\n    decay_rate: 1.0e+300", "decay_rate"),
        ("lr_func: step\n    decay_rate: 10.0", "decay_rate"),
        ("lr_func: linear\n    cycle_epochs: 1\n    cycle_mul: 1.0e+300", "cycle_mul"),
    ],
)
def test_lr_functions_that_would_grow_the_lr_above_one(fields, name):
    text = recipe(
        "  - !LearningRateFunctionModifier\n    start_epoch: 0\n    end_epoch: 4\n"
        f"    init_lr: 0.1\n    final_lr: 0.01\n    {fields}\n"
    )
    with pytest.raises(RecipeError, match=f"{name}.*grow above 1"):
        load_modifiers(text)


def test_lr_functions_that_decay_or_grow_within_one_still_load():
    for fields in (
        "lr_func: exponential\n    decay_rate: 0.5",
        "lr_func: step\n    decay_rate: 1.5",
    ):
        load_modifiers(
            recipe(
                "  - !LearningRateFunctionModifier\n    start_epoch: 0\n    end_epoch: 4\n"
                f"    init_lr: 0.1\n    final_lr: 0.01\n    {fields}\n"
            )
        )


def test_malformed_yaml_is_one_line_with_its_position():
    with pytest.raises(RecipeError) as err:
        load_modifiers("modifiers:\n  - !GMPruningModifier\n    final_sparsity: [0.5\n")
    message = str(err.value)
    assert "\n" not in message
    assert "not valid YAML" in message and "line 4, column 1" in message


def test_damp_beyond_float32_range_is_refused():
    base = (
        "  - !OBSPruningModifier\n    params: __ALL_PRUNABLE__\n    init_sparsity: 0.5\n"
        "    final_sparsity: 0.5\n    start_epoch: 0\n    end_epoch: 1\n    update_frequency: 1\n"
    )
    with pytest.raises(RecipeError, match=r"damp.*1e\+20"):
        load_modifiers(recipe(base + "    damp: 1.0e+45\n"))
    load_modifiers(recipe(base + "    damp: 1.0e+6\n"))


def test_nm_mask_names_the_field_that_differs_from_n_over_m():
    base = (
        "  - !GMPruningModifier\n    params: __ALL_PRUNABLE__\n    final_sparsity: 0.5\n"
        "    mask_type: '2:4'\n    start_epoch: 0\n    end_epoch: 1\n    update_frequency: 1\n"
    )
    with pytest.raises(RecipeError, match="'init_sparsity' = 0.0 must equal N/M = 0.5"):
        load_modifiers(recipe(base))
    load_modifiers(recipe(base + "    init_sparsity: 0.5\n"))
