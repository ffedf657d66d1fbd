"""The example of docs/adding-a-pruner.md, run as written: a score-only pruner in a few lines."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sparseml.grad_sampler import GradSampler
from sparseml.kernels.fisher import block_diag
from sparseml.kernels.fisher_build import block_fisher_inverse
from sparseml.pytorch.optim import ScheduledModifierManager
from toy import mlp, sampler

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding-a-pruner.md"


def doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_documented_pruner_registers_and_prunes() -> None:
    namespace: dict = {}
    exec(doc_blocks("python")[0], namespace)  # defines and registers MyOBDPruningModifier
    model, dense_model = mlp(), mlp()
    dense = [p.detach().clone() for p in model.parameters()]
    manager = ScheduledModifierManager.from_yaml(doc_blocks("yaml")[0])
    manager.apply(model, grad_sampler=sampler())
    weights = [model[0].weight, model[2].weight]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * total)
    # score only: every kept weight is unchanged
    for w, d in zip(weights, (dense[0], dense[2])):
        kept = w != 0
        assert torch.equal(w[kept], d[kept])
    # the pruned set is the lowest w^2 / (2 [H]_qq) of the block Fisher of the same samples
    grad_sampler = GradSampler.from_kwargs(sampler(), {}, "oracle")
    params = [dense_model[0].weight, dense_model[2].weight]
    chunks = list(grad_sampler.iter_chunks(dense_model, params, 64))
    scores = []
    for i, p in enumerate(params):
        H = block_fisher_inverse(torch.cat([c[i] for c in chunks]), 32, 1e-4)
        scores.append(p.detach().reshape(-1).square() / (2 * block_diag(H, p.numel())))
    flat = torch.cat(scores)
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    pruned[flat.argsort()[: round(0.5 * total)]] = True
    assert torch.equal(torch.cat([(w == 0).reshape(-1) for w in weights]), pruned)


def test_the_documented_estimator_of_its_own_prunes_by_its_saliency() -> None:
    namespace: dict = {}
    exec(doc_blocks("python")[1], namespace)  # MeanAbsGradient and MySaliencyPruningModifier
    recipe = doc_blocks("yaml")[0].replace("MyOBDPruningModifier", "MySaliencyPruningModifier")
    recipe = "\n".join(
        line
        for line in recipe.splitlines()
        if "fisher_block_size" not in line and "damp" not in line
    )
    model, dense_model = mlp(), mlp()
    ScheduledModifierManager.from_yaml(recipe).apply(model, grad_sampler=sampler())
    weights = [model[0].weight, model[2].weight]
    total = sum(w.numel() for w in weights)
    assert total == sum(p.numel() for n, p in model.named_parameters() if "weight" in n)
    # the pruned set is the lowest |w| * mean |g| of the same 64 samples
    grad_sampler = GradSampler.from_kwargs(sampler(), {}, "oracle")
    params = [dense_model[0].weight, dense_model[2].weight]
    chunks = list(grad_sampler.iter_chunks(dense_model, params, 64))
    scores = [
        p.detach().reshape(-1).double().abs()
        * torch.cat([c[i] for c in chunks]).abs().double().mean(0)
        for i, p in enumerate(params)
    ]
    flat = torch.cat(scores)
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    pruned[flat.argsort()[: round(0.5 * total)]] = True
    assert torch.equal(torch.cat([(w == 0).reshape(-1) for w in weights]), pruned)
    # its memory figure: the float64 sums, plus the larger of a gradient chunk and pruning
    (pruner,) = ScheduledModifierManager.from_yaml(recipe).modifiers
    pruner.initialize(mlp(), grad_sampler=sampler())
    items, _ = pruner.estimator().memory(pruner, None, 64)
    assert items[0].what == "mean |g| sums (float64)" and items[0].nbytes == 8 * total
