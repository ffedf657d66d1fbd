"""Every pruner takes every selector it declares (``SELECTORS``) and refuses the others in one
recipe line that names the selectors it has; the selectors' own rules on hand-made scores."""

from __future__ import annotations

import pytest
import torch

from sparseml.errors import RecipeError
from sparseml.masks import MaskSpec
from sparseml.pruning import PruningModifier
from sparseml.pruning.selectors import FlopsTarget, Reweighted, Threshold, layer_targets
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.registry import modifier_classes

PRUNERS = sorted(
    n
    for n, c in modifier_classes().items()
    if issubclass(c, PruningModifier)
    and c.__module__.startswith("sparseml.")
    and "final_sparsity" in c.fields
)
# the fields that ask for each selector kind (a Fisher block size a multiple of the groups)
ASKS = {
    "layer": "global_sparsity: false",
    "global": "global_sparsity: true",
    "block": "mask_type: block4\n    global_sparsity: false",
    "nm": 'mask_type: "2:4"\n    init_sparsity: 0.5\n    final_sparsity: 0.5',
    "flops": "flops_target: 0.5\n    global_sparsity: true",
}


def recipe(name: str, kind: str) -> str:
    lines = ["params: ['re:.*weight']", "start_epoch: 0", "end_epoch: 0"]
    if kind not in ("nm", "flops"):
        lines.append("final_sparsity: 0.5")
    if "fisher_block_size" in modifier_classes()[name].fields:
        lines.append("fisher_block_size: 8")
    body = "\n    ".join([*lines, ASKS[kind]])
    return f"modifiers:\n  - !{name}\n    {body}\n"


@pytest.mark.parametrize("kind", sorted(ASKS))
@pytest.mark.parametrize("name", PRUNERS)
def test_a_pruner_takes_its_selectors_and_names_them_when_refusing(name: str, kind: str) -> None:
    cls = modifier_classes()[name]
    text = recipe(name, kind)
    if kind in cls.SELECTORS and (kind != "flops" or "flops_target" in cls.fields):
        try:
            ScheduledModifierManager.from_yaml(text)
        except RecipeError as err:  # only a pruner's own rule on global_sparsity may refuse
            assert "global_sparsity" in str(err) and "Magnitude" in name, str(err)
        return
    with pytest.raises(RecipeError) as err:
        ScheduledModifierManager.from_yaml(text)
    message = str(err.value)
    assert "\n" not in message and name in message
    if "flops_target" in cls.fields or kind != "flops":
        assert "selects with" in message or "global_sparsity" in message, message


def test_threshold_global_and_per_layer_and_groups() -> None:
    scores = [torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.tensor([0.5, 5.0, 6.0, 7.0])]
    glob = Threshold(MaskSpec(), True).select(scores, [0.5, 0.5])
    assert [m.tolist() for m in glob] == [[True, False, False, False], [False, True, True, True]]
    layer = Threshold(MaskSpec(), False).select(scores, [0.5, 0.5])
    assert [m.tolist() for m in layer] == [[True, False, True, False], [False, False, True, True]]
    nm = Threshold(MaskSpec("nm", 4, 2), False).select(scores, [0.5, 0.5])
    assert [m.tolist() for m in nm] == [[True, False, True, False], [False, False, True, True]]


def test_flops_target_takes_the_cheapest_prefix_and_reweighting_divides() -> None:
    scores = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    # MACs per weight 10 and 1: removing 50% of 22 MACs takes the first weight alone (10) and
    # then the second (20 >= 11)
    masks = FlopsTarget([10, 1]).select(scores, [0.5])
    assert [m.tolist() for m in masks] == [[False, False], [True, True]]
    # divided by 10: the first layer's scores fall below the second's
    masks = Reweighted(Threshold(MaskSpec(), True), [10, 1], 1.0).select(scores, [0.5, 0.5])
    assert [m.tolist() for m in masks] == [[False, False], [True, True]]


def test_layer_targets_hand_a_global_allocation_to_each_layer() -> None:
    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]
    assert layer_targets(Threshold(MaskSpec(), True), scores, [0.5, 0.5]) == [1.0, 0.0]
