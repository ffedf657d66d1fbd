"""Recipes that say less than they mean, and regexes that would hang.

Each hostile input is injected into a real recipe run (``ScheduledModifierManager``) or into
``select_params`` and must end in one ``RecipeError`` naming the entry or parameter, quickly.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from sparseml.errors import RecipeError
from sparseml.params import (
    ParamRef,
    assign_targets,
    compile_pattern,
    select_params,
)
from sparseml.pruning import PruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.registry import modifier_classes

PRUNERS = sorted(
    n
    for n, c in modifier_classes().items()
    if issubclass(c, PruningModifier)
    and c.__module__.startswith("sparseml.")
    and "final_sparsity" in c.fields  # the constant pruner takes no target (tested on its own)
)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))


def gm(params: str, final: str = "0.5") -> str:
    return f"""
modifiers:
  - !GMPruningModifier
    params: {params}
    init_sparsity: {final if not final.startswith("{") else "0.05"}
    final_sparsity: {final}
    start_epoch: 0
    end_epoch: 0
"""


# ----- catastrophic regexes ---------------------------------------------------------
@pytest.mark.parametrize(
    "pattern",
    [
        r"(a+)+$",
        r"(a|aa)+$",
        r"(x*)*y",
        r"(?:a?){25}a{25}",
        r"(\w+\.)+weightX",
        r".*.*.*.*.*.*.*.*.*X",
        r"(a)\1",
    ],
)
def test_catastrophic_regex_is_refused_fast_naming_it(pattern):
    net = nn.Sequential(nn.Linear(2, 2))
    net.add_module("a" * 40, nn.Linear(2, 2))  # a name that makes (a+)+$ take ages
    start = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        select_params(net, [f"re:{pattern}"], "GMPruningModifier")
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert repr(f"re:{pattern}") in msg and "allowed:" in msg and "\n" not in msg


def test_catastrophic_regex_in_a_recipe_fails_before_pruning():
    manager = ScheduledModifierManager.from_yaml(gm('["re:(.*weight)+$"]'))
    with pytest.raises(RecipeError, match="exponential time"):
        manager.apply(model())


@pytest.mark.parametrize(
    "pattern",
    [
        r".*(conv1.(3|6)|layer\d+.\d+.(conv|downsample.1)).*weight",  # shipped recipes
        r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight",
        r"[0-9]+\.weight",
        r"(?:[0-9]\.){1}weight",
    ],
)
def test_ordinary_regexes_still_compile(pattern):
    compile_pattern("re:" + pattern, "m")


@pytest.mark.parametrize("pattern", [r"\w*\w*\w*\w*X", r".*.*.*.*X", r"a{1,99}a{1,99}a{1,99}a?X"])
def test_polynomial_blowup_on_long_names_is_refused_fast(pattern):
    net = nn.Sequential()
    net.add_module("a" * 250, nn.Linear(2, 2))  # ~2 s per match of the first pattern, unbounded
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="too many for parameter names of 2"):
        select_params(net, [f"re:{pattern}"])
    assert time.perf_counter() - start < 1.0
    assert len(select_params(net, ["__ALL_PRUNABLE__"])) == 1
    short = nn.Sequential(nn.Linear(2, 2))  # the same pattern on ordinary names: allowed
    with pytest.raises(RecipeError, match="match no parameter"):
        select_params(short, [f"re:{pattern}"])


def test_compile_pattern_bound_follows_the_name_length():
    compile_pattern("re:.*.*.*.*X", "m", longest_name=100)
    with pytest.raises(RecipeError, match="names up to 100 characters"):
        compile_pattern("re:.*.*.*.*X", "m", longest_name=101)
    compile_pattern("re:.*X", "m", longest_name=10**6)  # one repetition: linear, any length


# ----- params: [] ---------------------------------------------------------------------
def test_empty_params_list_is_refused_not_every_layer():
    manager = ScheduledModifierManager.from_yaml(gm("[]"))
    net = model()
    with pytest.raises(RecipeError, match="params is empty"):
        manager.apply(net)
    assert all(bool((p != 0).all()) for p in net.parameters())  # nothing pruned


def test_empty_params_with_a_mapping_still_means_the_mapping():
    final = "{0.5: ['0.weight'], 0.75: ['2.weight']}"
    manager = ScheduledModifierManager.from_yaml(gm("[]", final))
    net = model()
    manager.apply(net)
    assert float((net[0].weight == 0).float().mean()) == pytest.approx(0.5)
    assert float((net[2].weight == 0).float().mean()) == pytest.approx(0.75)


def test_empty_list_under_a_mapping_target_is_refused():
    manager = ScheduledModifierManager.from_yaml(gm("[]", "{0.5: ['0.weight'], 0.75: []}"))
    with pytest.raises(RecipeError, match="params is empty"):
        manager.apply(model())


# ----- a parameter under two mapping targets ------------------------------------------
def test_parameter_under_two_targets_is_refused_naming_both():
    final = "{0.5: ['re:.*weight'], 0.9: ['2.weight']}"
    manager = ScheduledModifierManager.from_yaml(gm("[]", final))
    with pytest.raises(RecipeError) as err:
        manager.apply(model())
    assert "2.weight" in str(err.value) and "0.5" in str(err.value) and "0.9" in str(err.value)


def test_assign_targets_is_pure_and_keeps_map_order():
    net = model()
    refs = {r.name: r for r in select_params(net, ["re:.*weight"])}

    def select(patterns: list[str]) -> list[ParamRef]:
        return [refs[p] for p in patterns]

    chosen, targets = assign_targets({0.3: ["2.weight"], 0.6: ["0.weight", "2.weight"][:1]}, select)
    assert [r.name for r in chosen] == ["2.weight", "0.weight"] and targets == [0.3, 0.6]
    with pytest.raises(RecipeError, match="0.weight"):
        assign_targets({0.3: ["0.weight"], 0.6: ["0.weight"]}, select)


# ----- frozen and meta parameters, every pruner -----------------------------------------
def frozen_recipe(name: str, params: str) -> str:
    from test_pruner_contract import extra_fields

    return f"""
modifiers:
  - !{name}
    params: {params}
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 0
    {extra_fields(name)}
"""


@pytest.mark.parametrize("name", PRUNERS)
def test_frozen_parameter_named_by_a_recipe_is_refused_under_every_pruner(name):
    net = model()
    net[0].weight.requires_grad_(False)
    manager = ScheduledModifierManager.from_yaml(frozen_recipe(name, '["re:.*weight"]'))
    with pytest.raises(RecipeError) as err:
        manager.apply(net)
    assert "frozen parameter 0.weight" in str(err.value) and "\n" not in str(err.value)


def test_all_prunable_skips_frozen_parameters_under_magnitude():
    net = model()
    net[0].weight.requires_grad_(False)
    before = net[0].weight.detach().clone()
    manager = ScheduledModifierManager.from_yaml(gm('["__ALL_PRUNABLE__"]'))
    manager.apply(net)
    assert torch.equal(net[0].weight, before)  # frozen: untouched
    assert float((net[2].weight == 0).float().mean()) == pytest.approx(0.5)


@pytest.mark.parametrize("token", ["__ALL__", "__ALL_PRUNABLE__"])
def test_a_fully_frozen_model_under_a_token_says_why_nothing_matched(token):
    net = model().requires_grad_(False)
    with pytest.raises(RecipeError, match="frozen parameters are skipped"):
        select_params(net, [token])


@pytest.mark.parametrize("name", PRUNERS)
def test_meta_parameters_are_refused_under_every_pruner(name):
    with torch.device("meta"):
        net = model()
    manager = ScheduledModifierManager.from_yaml(frozen_recipe(name, '["__ALL_PRUNABLE__"]'))
    with pytest.raises(RecipeError, match="meta device"):
        manager.apply(net)


def test_constant_pruner_refuses_frozen_and_meta_parameters():
    recipe = (
        "modifiers:\n  - !ConstantPruningModifier\n    params: ['re:.*weight']\n"
        "    start_epoch: 0\n    end_epoch: 1\n"
    )
    frozen = nn.Sequential(nn.Linear(4, 4))
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(RecipeError, match="frozen parameter 0.weight"):
        ScheduledModifierManager.from_yaml(recipe).apply(frozen)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RecipeError, match="meta"):
        ScheduledModifierManager.from_yaml(recipe).apply(meta)
