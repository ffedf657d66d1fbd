"""Recipe loading: sources, groups, variables, eval, anchors, overrides, tags, round trip."""

import pytest

from sparseml.errors import RecipeError
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.pytorch.sparsification import (
    GlobalMagnitudePruningModifier,
    GMPruningModifier,
    LearningRateFunctionModifier,
)
from sparseml.recipe import load_modifiers

CAP_STYLE = """
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: 20

  - !LearningRateFunctionModifier
    start_epoch: 0
    end_epoch: 20
    lr_func: linear
    init_lr: 1e-4
    final_lr: 1.0e-5
    cycle_epochs: 20
    cycle_mul: 1.0

pruning_modifiers:
  - !GlobalMagnitudePruningModifier
    params: ["re:.*blocks.*.attn.qkv.weight", "re:.*blocks.*.mlp.fc1.weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 20
    update_frequency: 20
    inter_func: linear
    mask_type: unstructured
    global_sparsity: True
"""

MFAC_CARD = """<!--
Copyright notice of a recipe card. The front matter follows this comment.
-->

---
start_epoch: &start_epoch 0.0
end_epoch: &end_epoch 3.0
pruning_start_epoch: &pruning_start_epoch 0.0
pruning_end_epoch: &pruning_end_epoch 2.0
lr: &lr 0.0004
pruning_update_frequency: &pruning_update_frequency 1.0
pruning_mask_type: &pruning_mask_type unstructured
target_sparsities: &target_sparsities
  0.9: ['re:.*layer1.*weight']
  0.95: ['re:.*layer2.*weight']

training_modifiers:
  - !EpochRangeModifier
    start_epoch: *start_epoch
    end_epoch: *end_epoch
  - !SetLearningRateModifier
    start_epoch: *start_epoch
    learning_rate: *lr
  - !SetWeightDecayModifier
    start_epoch: 2.0
    weight_decay: 0.0

pruning_modifiers:
  - !GMPruningModifier
    params: []
    init_sparsity: 0.05
    final_sparsity: *target_sparsities
    start_epoch: *pruning_start_epoch
    end_epoch: *pruning_end_epoch
    update_frequency: *pruning_update_frequency
    mask_type: *pruning_mask_type
---

# Prose after the front matter is ignored.
"""


def test_cap_style_recipe_loads_with_sorted_modifiers_and_max_epochs():
    manager = ScheduledModifierManager.from_yaml(CAP_STYLE)
    names = [type(m).__name__ for m in manager.modifiers]
    assert names == [
        "EpochRangeModifier",
        "GlobalMagnitudePruningModifier",
        "LearningRateFunctionModifier",
    ]
    assert manager.max_epochs == 20
    lr = manager.learning_rate_modifiers[0]
    assert isinstance(lr, LearningRateFunctionModifier) and lr.init_lr == pytest.approx(1e-4)
    assert "LearningRate" in str(lr)
    gm = manager.pruning_modifiers[0]
    assert isinstance(gm, GlobalMagnitudePruningModifier) and gm.inter_func == "linear"


def test_markdown_card_with_html_comment_anchors_and_dict_sparsity(tmp_path):
    path = tmp_path / "card.md"
    path.write_text(MFAC_CARD)
    manager = ScheduledModifierManager.from_yaml(str(path))
    assert len(manager.modifiers) == 4
    gm = manager.pruning_modifiers[0]
    assert isinstance(gm, GMPruningModifier)
    assert gm.final_sparsity == {0.9: ["re:.*layer1.*weight"], 0.95: ["re:.*layer2.*weight"]}
    assert manager.max_epochs == 3


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_and_yml_paths(tmp_path, suffix):
    path = tmp_path / f"recipe{suffix}"
    path.write_text(CAP_STYLE)
    assert len(load_modifiers(path)) == 3


def test_eval_variables_chained_negation_and_non_numeric_by_name():
    text = """
a: eval(b * 2)
b: 5
mask: "2:4"
neg: eval(-b + 20)
modifiers:
  - !GMPruningModifier
    start_epoch: eval(max(0, -a))
    end_epoch: eval(neg - 1)
    init_sparsity: 0.5
    final_sparsity: eval(round(1 / 2, 3))
    mask_type: eval(mask)
"""
    (mod,) = load_modifiers(text)
    assert mod.start_epoch == 0 and mod.end_epoch == 14
    assert mod.final_sparsity == 0.5 and mod.mask_type == "2:4"


@pytest.mark.parametrize(
    "expr, message",
    [
        ("__import__('os')", "not allowed"),
        ("missing + 1", "unknown variable"),
        ("b.real", "not allowed"),
    ],
)
def test_eval_is_safe_and_errors_name_the_problem(expr, message):
    text = f"b: 1\nmodifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: eval({expr})\n"
    with pytest.raises(RecipeError, match=message):
        load_modifiers(text)


def test_recipe_variables_override_and_unknown_name():
    text = "num_epochs: 10\nmodifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: eval(num_epochs)\n"
    assert load_modifiers(text, {"num_epochs": 4})[0].end_epoch == 4
    assert load_modifiers(text, "num_epochs=6")[0].end_epoch == 6
    assert load_modifiers(text, '{"num_epochs": 7}')[0].end_epoch == 7
    with pytest.raises(RecipeError, match="not a top-level variable"):
        load_modifiers(text, {"epochs": 4})


def test_qualified_tags_single_modifier_and_plain_list():
    assert (
        len(load_modifiers("!pytorch.EpochRangeModifier\n  start_epoch: 0\n  end_epoch: 1\n")) == 1
    )
    text = "- !EpochRangeModifier\n  start_epoch: 0\n  end_epoch: 1\n- !EpochRangeModifier\n  start_epoch: 0\n  end_epoch: 2\n"
    assert len(load_modifiers(text)) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "modifiers:\n  - !GMPrunngModifier\n    end_epoch: 1\n",
            "did you mean: GMPruningModifier",
        ),
        (
            "modifiers:\n  - !GMPruningModifier\n    final_sparsty: 0.5\n",
            "did you mean: final_sparsity",
        ),
        (
            "modifiers:\n  - !GMPruningModifier\n    final_sparsity: 1.5\n",
            r"final_sparsity.*\[0.0, 1.0\)",
        ),
        ("modifiers:\n  - !GMPruningModifier\n    final_sparsity: high\n", "must be a number"),
        (
            "modifiers:\n  - !GMPruningModifier\n    init_sparsity: 0.6\n    final_sparsity: 0.5\n",
            "init_sparsity",
        ),
        (
            "modifiers:\n  - !GMPruningModifier\n    start_epoch: 5\n    end_epoch: 2\n    final_sparsity: 0.5\n",
            "end_epoch",
        ),
        (
            "modifiers:\n  - !GMPruningModifier\n    final_sparsity: 0.7\n    mask_type: '2:4'\n",
            "N/M",
        ),
        (
            "modifiers:\n  - !GMPruningModifier\n    final_sparsity: 0.5\n    mask_type: diagonal\n",
            "mask_type",
        ),
        ("modifiers:\n  - !GMPruningModifier\n    inter_func: quadratic\n", "inter_func"),
        ("modifiers:\n  - !GMPruningModifier\n    update_frequency: 0\n", "update_frequency"),
        (
            "foo:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 1\n",
            "contains 'modifiers'",
        ),
        ("a: 1\nb: 2\n", "no modifiers"),
        ("modifiers: [\n", "not valid YAML"),
        ("modifiers:\n  - !!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
        ("zoo:cv/classification/resnet", "SparseZoo"),
    ],
)
def test_bad_recipes_raise_clear_errors(text, message):
    with pytest.raises(RecipeError, match=message):
        load_modifiers(text)


def test_error_names_recipe_modifier_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pruning_modifiers:\n  - !GMPruningModifier\n    final_sparsity: 2\n")
    with pytest.raises(RecipeError) as info:
        load_modifiers(path)
    text = str(info.value)
    assert (
        "bad.yaml" in text
        and "GMPruningModifier" in text
        and "line 2" in text
        and "final_sparsity" in text
    )


def test_unreadable_and_wrong_extension(tmp_path):
    with pytest.raises(RecipeError, match="cannot be read"):
        load_modifiers(str(tmp_path / "missing.yaml"))
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(RecipeError, match=".yaml, .yml or .md"):
        load_modifiers(str(tmp_path / "r.txt"))
    (tmp_path / "r.md").write_text("# no front matter here")
    with pytest.raises(RecipeError, match="front matter"):
        load_modifiers(str(tmp_path / "r.md"))


def test_front_matter_ends_only_at_a_marker_line(tmp_path):
    """A ``# ---- pruning ----`` comment inside the front matter neither ends nor opens it."""
    card = tmp_path / "card.md"
    card.write_text(
        "---\ntraining_modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n"
        "    end_epoch: 2\n# ------------ pruning ------------\npruning_modifiers:\n"
        "  - !GMPruningModifier\n    params: __ALL_PRUNABLE__\n    init_sparsity: 0.2\n"
        "    final_sparsity: 0.5\n    start_epoch: 0\n    end_epoch: 1\n"
        "    update_frequency: 0.5\n---  \n\n# Prose --- with dashes --- after it.\n"
    )
    names = [type(m).__name__ for m in load_modifiers(card)]
    assert sorted(names) == ["EpochRangeModifier", "GMPruningModifier"]
    inline = tmp_path / "inline.md"
    inline.write_text("# Title --- with dashes ---\n\nNo marker line here: --- x ---\n")
    with pytest.raises(RecipeError, match="front matter"):
        load_modifiers(inline)


def test_dump_round_trip_gives_equal_modifiers(tmp_path):
    manager = ScheduledModifierManager.from_yaml(CAP_STYLE)
    again = ScheduledModifierManager.from_yaml(str(manager))
    assert again.modifiers == manager.modifiers
    path = tmp_path / "saved.yaml"
    manager.save(path)
    assert ScheduledModifierManager.from_yaml(str(path)).modifiers == manager.modifiers
    card = tmp_path / "card.md"
    card.write_text(MFAC_CARD)
    original = load_modifiers(card)
    assert load_modifiers(ScheduledModifierManager(original).__str__()) == sorted(
        original, key=lambda m: m.sort_key()
    )


def test_setting_fields_converts_at_once_and_checks_relations_on_use():
    import torch

    gm = load_modifiers(CAP_STYLE)[2]
    gm.init_sparsity = 0.7  # above the old final: allowed until used
    gm.final_sparsity = "0.8"
    assert gm.final_sparsity == 0.8
    with pytest.raises(RecipeError, match="final_sparsity"):
        gm.final_sparsity = 1.0
    gm.init_sparsity = 0.9
    with pytest.raises(RecipeError, match="init_sparsity"):
        gm.initialize(torch.nn.Linear(2, 2))
