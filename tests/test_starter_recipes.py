"""The starter recipes (research/recipes/starter/) prune a tiny timm model of their family,
one-shot and gradually, selecting the layers their header promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ensure_research
from sparseml.pytorch.optim import ScheduledModifierManager

ensure_research()
import timm  # noqa: E402

STARTER = Path(__file__).resolve().parents[1] / "research" / "recipes" / "starter"
# family -> (tiny timm model, a selected name, a name left dense)
FAMILIES = {
    "vit": ("test_vit", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"),
    "resnet": ("test_resnet", "layer1.0.conv1.weight", "fc.weight"),
    "convnext": (
        "test_convnext",
        "stages.0.blocks.0.mlp.fc1.weight",
        "stages.0.blocks.0.conv_dw.weight",
    ),
    "efficientnet": ("test_efficientnet", "blocks.1.0.conv_pwl.weight", "conv_stem.weight"),
    "any": ("test_resnet", "fc.weight", None),
}
FAST = {"num_grads": 4, "fisher_block_size": 32}


def tiny(family: str) -> torch.nn.Module:
    name = FAMILIES[family][0]
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=4, **kwargs)


def sampler() -> dict:
    def build(**kw):
        gen = torch.Generator().manual_seed(0)
        while True:
            yield (
                [torch.randn(2, 3, 32, 32, generator=gen)],
                {},
                torch.randint(0, 4, (2,), generator=gen),
            )

    return {"data_loader_builder": build, "loss_fn": F.cross_entropy}


def check(model, manager, target: float, family: str) -> None:
    pruner = manager.pruning_modifiers[0]
    names = {r.name for r in pruner.refs}
    _, selected, dense = FAMILIES[family]
    assert selected in names and (dense is None or dense not in names)
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    assert zeros == round(target * sum(params[n].numel() for n in names))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_shot_starter(family: str, one_thread) -> None:
    model = tiny(family)
    manager = ScheduledModifierManager.from_yaml(
        str(STARTER / f"{family}_one_shot.yaml"), recipe_variables={**FAST, "sparsity": 0.6}
    )
    manager.apply(model, grad_sampler=sampler())
    check(model, manager, 0.6, family)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradual_starter(family: str, one_thread) -> None:
    model = tiny(family)
    variables = {**FAST, "num_epochs": 4, "pruning_start": 0, "pruning_end": 2}
    manager = ScheduledModifierManager.from_yaml(
        str(STARTER / f"{family}_gradual.yaml"), recipe_variables=variables
    )
    manager.check_run_length(4, steps_per_epoch=1)
    opt = manager.modify(
        model, torch.optim.SGD(model.parameters(), lr=0.01), 1, grad_sampler=sampler()
    )
    batches = sampler()["data_loader_builder"]()
    for _ in range(3):  # epochs 0, 1, 2: the last pruning step reaches final_sparsity
        (x,), _, y = next(batches)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    check(model, manager, 0.8, family)
