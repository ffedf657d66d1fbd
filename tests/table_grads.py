"""A grad sampler whose samples are the rows of a fixed table (tests of the OBS family)."""

from __future__ import annotations

import torch
from torch import nn

from sparseml.grad_sampler import GradSampler
from sparseml.pytorch.optim import ScheduledModifierManager


class TableGrads(GradSampler):
    """The i-th sample is row i (cyclically) of ``table``, split over the pruned params;
    ``batch`` (optional) is what ``example_batch`` returns (FLOPs probes)."""

    def __init__(self, table: torch.Tensor, batch: tuple | None = None) -> None:
        super().__init__(lambda **kw: iter([batch] if batch else []), lambda out, t: out.sum())
        self.table, self.row = table, 0

    def _one_gradient(self, module: nn.Module, params, dtype):
        sample, self.row = self.table[self.row % len(self.table)], self.row + 1
        out, start = [], 0
        for p in params:
            out.append(sample[start : start + p.numel()].to(dtype))
            start += p.numel()
        return out


def one_shot(model: nn.Module, tag: str, fields: dict, sampler: GradSampler):
    """Apply one ``!tag`` modifier with ``fields`` (one-shot); returns the modifier."""
    lines = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    text = (
        f"pruning_modifiers:\n  - !{tag}\n    start_epoch: 0\n    end_epoch: 1\n"
        f"    update_frequency: 1\n{lines}"
    )
    manager = ScheduledModifierManager.from_yaml(text)
    manager.apply(model, grad_sampler=sampler)
    return manager.modifiers[0]
