"""SparseML's LearningRateModifier: each lr_class's LR sequence against torch's own scheduler,
driven through the manager's optimizer wrapper, and one-line errors for bad fields."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparseml.errors import RecipeError
from sparseml.pytorch.optim import ScheduledModifierManager

STEPS = 4  # optimizer steps per epoch
EPOCHS = 9
BEFORE = 0.5  # the optimizer's own LR, kept until start_epoch


def recipe(lr_class: str, kwargs: str, start: float = 1, end: float = 7) -> str:
    return f"""
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: {EPOCHS}
  - !LearningRateModifier
    start_epoch: {start}
    end_epoch: {end}
    lr_class: {lr_class}
    lr_kwargs: {kwargs}
    init_lr: 0.1
    update_frequency: -1.0
    constant_logging: false
    log_types: __ALL__
"""


def recipe_lrs(text: str) -> list[float]:
    """The LR used by every optimizer step of EPOCHS epochs under the recipe."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=BEFORE)
    manager = ScheduledModifierManager.from_yaml(text)
    optimizer = manager.modify(model, optimizer, steps_per_epoch=STEPS)
    lrs = []
    for _ in range(EPOCHS * STEPS):
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def torch_lrs(make, start: float, end: float, per: str) -> list[float]:
    """The same schedule from torch's scheduler on a plain optimizer: before ``start`` the
    optimizer's LR, from ``start`` the scheduler stepped once per optimizer step (``per="step"``),
    once per epoch (``"epoch"``) or with the fractional epoch (``"fraction"``); from ``end`` on,
    the last LR."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = make(optimizer)
    lrs, steps_done = [], 0
    for i in range(EPOCHS * STEPS):
        epoch = i / STEPS
        if epoch < start:
            lrs.append(BEFORE)
            continue
        if epoch >= end:
            lrs.append(lrs[-1])
            continue
        offset = epoch - start
        if per == "fraction":
            scheduler.step(offset)
        else:
            target = round(offset * STEPS) if per == "step" else math.floor(offset)
            while steps_done < target:
                optimizer.step()
                scheduler.step()
                steps_done += 1
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


CASES = {
    "StepLR": (
        "{step_size: 2, gamma: 0.5}",
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2 * STEPS, gamma=0.5),
        "step",
    ),
    "MultiStepLR": (
        "{milestones: [2, 4.5], gamma: 0.1}",  # absolute epochs; torch counts from start (1)
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1 * STEPS, 14], gamma=0.1),
        "step",
    ),
    "ExponentialLR": (
        "{gamma: 0.8}",
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
        "epoch",
    ),
    "CosineAnnealingWarmRestarts": (
        "{T_0: 2, T_mult: 2, eta_min: 0.001}",
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            o, T_0=2, T_mult=2, eta_min=0.001
        ),
        "fraction",
    ),
}


@pytest.mark.parametrize("lr_class", sorted(CASES))
def test_lr_sequence_equals_torch_scheduler(lr_class: str) -> None:
    kwargs, make, per = CASES[lr_class]
    got = recipe_lrs(recipe(lr_class, kwargs))
    expected = torch_lrs(make, 1, 7, per)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert got[:STEPS] == [BEFORE] * STEPS  # untouched before start_epoch
    assert got[STEPS] == 0.1  # init_lr at start_epoch
    assert len(set(got[7 * STEPS :])) == 1  # frozen from end_epoch on
    assert len(set(got[STEPS : 7 * STEPS])) > 2  # and it did change in between


def test_sparseml_cosine_names_equal_torch_names() -> None:
    torch_names = recipe_lrs(recipe("CosineAnnealingWarmRestarts", "{T_0: 3, eta_min: 0.01}"))
    sparseml_names = recipe_lrs(
        recipe("CosineAnnealingWarmRestarts", "{cycle_epochs: 3, lr_min: 0.01}")
    )
    assert torch_names == sparseml_names


def test_never_ending_modifier_keeps_stepping() -> None:
    lrs = recipe_lrs(recipe("StepLR", "{step_size: 1, gamma: 0.5}", start=0, end=-1))
    assert lrs[-1] == pytest.approx(0.1 * 0.5 ** (EPOCHS - 1))


def test_resume_mid_run_continues_the_sequence() -> None:
    """A manager restored from a state dict (fresh scheduler) writes the same LRs."""
    text = recipe("MultiStepLR", "{milestones: [3, 5], gamma: 0.5}")
    full = recipe_lrs(text)
    model = nn.Linear(2, 1)
    manager = ScheduledModifierManager.from_yaml(text)
    optimizer = manager.modify(model, torch.optim.SGD(model.parameters(), lr=BEFORE), STEPS)
    for _ in range(4 * STEPS):
        optimizer.step()
    state = manager.state_dict()
    resumed = ScheduledModifierManager.from_yaml(text)
    resumed.load_state_dict(state)
    optimizer = resumed.modify(
        model, torch.optim.SGD(model.parameters(), lr=BEFORE), STEPS, epoch=4
    )
    lrs = []
    for _ in range(5 * STEPS):
        optimizer.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx(full[4 * STEPS :], rel=1e-12)


@pytest.mark.parametrize(
    ("lr_class", "kwargs", "message"),
    [
        ("CyclicLR", "{gamma: 0.1}", r"lr_class.*must be one of StepLR, MultiStepLR"),
        ("StepLR", "{gamma: 0.1}", r"lr_kwargs.*StepLR needs 'step_size'"),
        ("StepLR", "{step_size: 1, gama: 0.1}", r"'gama' is not an argument of StepLR.*step_size"),
        ("StepLR", "{step_size: 0, gamma: 0.1}", r"step_size \(epochs\) must be a number > 0"),
        ("MultiStepLR", "{milestones: [5, 3]}", r"milestones must be a non-empty increasing"),
        ("MultiStepLR", "{milestones: [1, 3]}", r"must all be > start_epoch \(1.0\)"),
        ("MultiStepLR", "{milestones: [2, 8]}", r"and < end_epoch \(7.0\)"),
        ("CosineAnnealingWarmRestarts", "{eta_min: 0}", r"exactly one of 'T_0' or 'cycle"),
        ("CosineAnnealingWarmRestarts", "{T_0: 1, T_mult: 0.5}", r"T_mult.*integer"),
    ],
)
def test_bad_fields_are_one_line_recipe_errors(lr_class, kwargs, message) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        ScheduledModifierManager.from_yaml(recipe(lr_class, kwargs))
    assert "\n" not in str(info.value)
    assert "LearningRateModifier" in str(info.value)


def test_importable_from_sparseml_paths() -> None:
    from sparseml.pytorch.sparsification import LearningRateModifier

    manager = ScheduledModifierManager.from_yaml(recipe("ExponentialLR", "{gamma: 0.9}"))
    assert [type(m) for m in manager.learning_rate_modifiers] == [LearningRateModifier]
