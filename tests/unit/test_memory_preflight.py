"""Memory and size preflight of the second-order pruners, before any gradient is drawn."""

from __future__ import annotations

import logging
import re
import time

import pytest
import torch
from torch import nn

import sparseml.memory as memory
from sparseml.errors import RecipeError
from sparseml.pytorch.optim import ScheduledModifierManager
from toy import mlp, sampler

ONE_SHOT = """
modifiers:
  - !{name}
    params: ["re:.*weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 0
    num_grads: {m}
    damp: 0.01
    fisher_block_size: {block}
"""


def counting_sampler(counter: list) -> dict:
    return sampler(counter)


def test_mfac_with_ten_million_grads_fails_in_seconds() -> None:
    model = nn.Sequential(nn.Linear(1000, 1000))  # 1M weights: m x d = 40 TB of float32
    text = ONE_SHOT.format(name="MFACPruningModifier", m=10_000_000, block="null")
    counter: list = []
    start = time.monotonic()
    with pytest.raises(RecipeError) as err:
        ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler(counter))
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "MFACPruningModifier needs about" in msg and "GiB" in msg
    assert "num_grads=10000000" in msg
    suggested = int(re.search(r"num_grads: (\d+) would fit", msg).group(1))
    assert 1 <= suggested < 10_000_000
    assert counter == []  # not a single gradient was drawn


@pytest.mark.parametrize("name", ["OBSPruningModifier", "CAPruningModifier"])
def test_block_pruner_too_big_names_fields_and_a_setting_that_fits(name, monkeypatch) -> None:
    # bytes: at B = 64 the blocks (plus, for CAP, its elimination workspace) and the chunk with
    # its float64 slice do not fit in 90% of this; a halved block (OBS) or a quarter (CAP) does
    free = 120_000
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    text = ONE_SHOT.format(name=name, m=80, block=64)
    with pytest.raises(RecipeError) as err:
        ScheduledModifierManager.from_yaml(text).apply(mlp(), grad_sampler=sampler())
    msg = str(err.value)
    assert "fisher_block_size=64" in msg and "num_grads=80" in msg and "GiB" in msg
    smaller = int(re.search(r"fisher_block_size: (\d+) would fit", msg).group(1))
    assert smaller < 64
    ScheduledModifierManager.from_yaml(ONE_SHOT.format(name=name, m=80, block=smaller)).apply(
        mlp(), grad_sampler=sampler()
    )  # the suggested setting does fit


def test_mfac_buffering_checked_before_the_buffer_is_allocated(monkeypatch) -> None:
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    text = ONE_SHOT.format(name="MFACPruningModifier", m=64, block=8).replace(
        "end_epoch: 0", "end_epoch: 1\n    use_gradient_buffering: true"
    )
    model = mlp()
    with pytest.raises(RecipeError, match="gradient buffer"):
        ScheduledModifierManager.from_yaml(text).modify(
            model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=2
        )


def test_block_size_larger_than_every_layer_is_clamped(caplog, monkeypatch) -> None:
    monkeypatch.setattr(memory, "_LOGGED", {})  # an earlier test may have logged this plan
    caplog.set_level(logging.INFO)
    manager = ScheduledModifierManager.from_yaml(
        ONE_SHOT.format(name="OBSPruningModifier", m=16, block=100_000)
    )
    model = mlp()  # largest selected weight: 8 x 8
    manager.apply(model, grad_sampler=sampler())
    assert manager.modifiers[0].fisher_block_size == 64
    assert "fisher_block_size 100000 exceeds the 64 weights" in caplog.text
    assert "memory plan: " in caplog.text and "Fisher blocks" in caplog.text
    assert int((model[0].weight == 0).sum() + (model[2].weight == 0).sum()) == 48


def test_more_samples_than_the_loader_holds_warns(caplog) -> None:
    caplog.set_level(logging.INFO)
    batches = [([torch.randn(4, 8)], {}, torch.randn(4, 4)) for _ in range(5)]
    grad_sampler = {
        "data_loader_builder": lambda **kw: batches,
        "loss_fn": torch.nn.functional.mse_loss,
    }
    text = ONE_SHOT.format(name="CAPruningModifier", m=12, block=8)
    ScheduledModifierManager.from_yaml(text).apply(mlp(), grad_sampler=grad_sampler)
    assert "num_grads 12 exceeds the 5 batches" in caplog.text
    assert "ETA" in caplog.text


def test_mfac_schedule_of_num_grads_gets_a_schedule_as_advice() -> None:
    model = nn.Sequential(nn.Linear(1000, 1000))
    text = ONE_SHOT.format(
        name="MFACPruningModifier", m="{0.0: 4000000, 0.5: 8000000}", block="null"
    )
    with pytest.raises(RecipeError) as err:
        ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=sampler())
    advice = re.search(r"num_grads: (\{.*\}) would fit", str(err.value))
    assert advice is not None, str(err.value)
    assert "0.0:" in advice.group(1) and "0.5:" in advice.group(1)


def test_fast_cap_plan_is_one_short_line_logged_once_per_sweep(caplog, monkeypatch) -> None:
    """One Fisher per layer is summed into one entry with its count, and a sweep that checks
    the same plan at every sparsity logs it once."""
    monkeypatch.setattr(memory, "_LOGGED", {})
    caplog.set_level(logging.INFO, logger="sparseml.memory")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(24)])
    for sparsity in (0.5, 0.7):
        text = ONE_SHOT.format(name="FastCAPruningModifier", m=4, block=8).replace(
            "0.5", str(sparsity)
        )

        def builder(**kw):
            return iter(lambda: ([torch.randn(4, 8)], {}, torch.randn(4, 8)), None)

        grad_sampler = {"data_loader_builder": builder, "loss_fn": nn.functional.mse_loss}
        ScheduledModifierManager.from_yaml(text).apply(model, grad_sampler=grad_sampler)
    plans = [r.getMessage() for r in caplog.records if "memory plan" in r.getMessage()]
    assert len(plans) == 1, plans
    assert len(plans[0]) < 200 and "(24 x)" in plans[0], plans[0]
