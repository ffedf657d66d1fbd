"""Multiply-accumulate counts of the prunable layers, for FLOPs-aware pruning.

A weight of a Linear or convolution layer takes part in one multiply-accumulate per output
position of its output channel: a convolution's output spatial positions (times the batch),
a Linear layer's tokens (every leading dimension of its output). So the MACs of a layer with
``nnz`` nonzero weights are ``nnz * macs_per_weight``, where ``macs_per_weight`` is measured
once, by one forward pass with hooks at the model's input size and a batch of 1.
A bias costs one addition per output position too; it is counted the same way when selected.

`macs_per_weight` raises `sparseml.errors.RecipeError` when the recipe's ``params`` select a
layer whose MACs are not counted: it is the only check of that recipe choice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparseml.errors import RecipeError

COUNTED = (nn.Linear, nn.modules.conv._ConvNd)


def _first_of_batch(value: Any) -> Any:
    """``value`` with every tensor cut to its first sample (nested lists, tuples, dicts)."""
    if isinstance(value, Tensor):
        return value[:1] if value.dim() > 0 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_first_of_batch(v) for v in value)
    if isinstance(value, dict):
        return {k: _first_of_batch(v) for k, v in value.items()}
    return value


def _uses_per_channel(module: nn.Module, out: Tensor) -> int:
    """Output positions per output channel of one call (the batch is 1)."""
    channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    return out.numel() // channels


@torch.no_grad()
def macs_per_weight(
    module: nn.Module, refs: list, example_args: Any, example_kwargs: dict | None = None
) -> list[int]:
    """MACs one weight of each ``refs`` parameter costs per sample (see the module docstring).

    Args:
        module: the model; ``refs``: `sparseml.params.ParamRef`s (their ``module`` must be a
            Linear or convolution layer). example_args / example_kwargs: a batch of model
            inputs; only its first sample is run.
    A layer called several times per forward counts every call; one never called costs 0.
    """
    for ref in refs:
        if not isinstance(ref.module, COUNTED):
            raise RecipeError(
                f"FLOPs are counted for Linear and convolution layers only; {ref.name} belongs "
                f"to a {type(ref.module).__name__}"
            )
    uses: dict[int, int] = {id(r.module): 0 for r in refs}

    def hook(layer: nn.Module, args: Any, out: Tensor) -> None:
        uses[id(layer)] += _uses_per_channel(layer, out)

    handles = [
        layer.register_forward_hook(hook)
        for layer in {id(r.module): r.module for r in refs}.values()
    ]
    was_training = module.training
    try:
        module.eval()
        module(*_first_of_batch(tuple(example_args)), **_first_of_batch(dict(example_kwargs or {})))
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return [uses[id(r.module)] for r in refs]


def dense_macs(per_weight: list[int], sizes: list[int]) -> int:
    """MACs of the layers with every weight nonzero: sum of numel_l * macs_per_weight_l."""
    return sum(int(n) * int(c) for n, c in zip(sizes, per_weight))


def kept_macs(per_weight: list[int], masks: list[Tensor]) -> int:
    """MACs counted over the kept (nonzero) weights only."""
    return sum(int(m.sum()) * int(c) for m, c in zip(masks, per_weight))


def macs_prefix_length(costs: Tensor, order: Tensor, removable: int, already: int) -> int:
    """The fewest entries of ``order`` (a permutation, lowest score first) whose removal
    takes away at least ``removable`` MACs, given each entry's cost ``costs`` (int64);
    never fewer than ``already`` (the entries pruned before, which come first)."""
    if removable <= 0:
        return already
    cumulative = torch.cumsum(costs[order], 0)
    k = int(torch.searchsorted(cumulative, torch.tensor([removable], device=costs.device)))
    return max(min(k + 1, order.numel()), already)
