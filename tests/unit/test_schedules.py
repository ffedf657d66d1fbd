"""Schedule functions: sparsity interpolation, recomputation spacing, LR cycles."""

import math

import pytest

from sparseml.errors import RecipeError
from sparseml.pytorch.sparsification import LearningRateFunctionModifier
from sparseml.schedules import interpolate, lr_function_value, recomputation_targets


@pytest.mark.parametrize(
    "func, mid",
    [
        ("linear", 0.5),
        ("cubic", 0.4 + (1 - 0.5**3) * 0.2),
        ("inverse_cubic", 0.4 + (1 - 0.5 ** (1 / 3)) * 0.2),
    ],
)
def test_interpolation_worked_example(func, mid):
    # GM 0.4 -> 0.6 over epochs 0 -> 40: values at 0, 20, 40 and clamping outside.
    assert interpolate(0, 0, 40, 0.4, 0.6, func) == 0.4
    assert interpolate(20, 0, 40, 0.4, 0.6, func) == pytest.approx(mid)
    assert interpolate(40, 0, 40, 0.4, 0.6, func) == 0.6
    assert interpolate(-5, 0, 40, 0.4, 0.6, func) == 0.4
    assert interpolate(99, 0, 40, 0.4, 0.6, func) == 0.6
    assert interpolate(math.inf, 0, 40, 0.4, 0.6, func) == 0.6


def test_cubic_matches_documented_value_and_step_schedule():
    assert interpolate(20, 0, 40, 0.4, 0.6, "cubic") == pytest.approx(0.575)
    assert interpolate(4.9, 5, 5, 0.1, 0.7, "linear") == 0.1
    assert interpolate(5, 5, 5, 0.1, 0.7, "linear") == 0.7
    with pytest.raises(RecipeError, match="inter_func"):
        interpolate(1, 0, 2, 0, 1, "square")


def test_recomputation_targets_start_from_current_sparsity():
    assert recomputation_targets(0.0, 0.8, 4) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert recomputation_targets(0.6, 0.8, 2) == pytest.approx([0.7, 0.8])
    cubic = recomputation_targets(0.5, 0.9, 2, "cubic")
    assert cubic[0] == pytest.approx(0.5 + 0.875 * 0.4) and cubic[1] == 0.9
    assert all(t >= 0.6 for t in recomputation_targets(0.6, 0.9, 3))


def _lr(func, epoch, **kw):
    base = dict(start_epoch=0, end_epoch=4, init_lr=1.0, final_lr=0.0, cycle_epochs=2)
    base.update(kw)
    return lr_function_value(func, epoch, 4, **base)


def test_linear_cycles_reach_final_on_last_step_and_never_zero_at_cycle_start():
    steps = [_lr("linear", k / 4) for k in range(16)]
    assert steps[0] == 1.0 and steps[8] == 1.0  # cycle starts: full LR, no zero step
    assert steps[7] == pytest.approx(0.0) and steps[15] == pytest.approx(0.0)
    assert steps[1] == pytest.approx(1 - 1 / 7)
    assert all(a > b for a, b in zip(steps[:7], steps[1:8]))


def test_cosine_cycle_mul_warmup_and_decays():
    assert _lr("cosine", 0) == 1.0
    assert _lr("cosine", 1.0) == pytest.approx(0.5)
    assert _lr("cosine", 2.0, cycle_mul=0.5) == pytest.approx(0.5)
    assert _lr("linear", 0, warmup=1.0) == pytest.approx(0.25)
    assert _lr("linear", 1.0, warmup=1.0, cycle_epochs=4) == pytest.approx(1 - 4 / 15)
    assert _lr("exponential", 1.0, decay_rate=0.5) == pytest.approx(0.5)
    assert _lr("step", 0.75, decay_rate=0.5) == 1.0 and _lr("step", 1.0, decay_rate=0.5) == 0.5


def test_modifier_writes_lr_and_holds_last_range_value_at_end():
    class Opt:
        param_groups = [{"lr": 9.0}, {"lr": 9.0}]

    mod = LearningRateFunctionModifier(
        lr_func="linear", init_lr=0.1, final_lr=0.01, start_epoch=0, end_epoch=2, cycle_epochs=2
    )
    opt = Opt()
    mod.update(None, opt, 0.0, 5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    mod.update(None, opt, 2.0, 5)  # the end update keeps the range's last value
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(RecipeError, match="end_epoch"):
        LearningRateFunctionModifier(lr_func="linear", init_lr=0.1, start_epoch=2, end_epoch=2)
