"""The skeleton shared by the pruners that score and update weights part by part.

One pruning step (per recomputation) is always: cut the selected parameters into this rank's
parts (`sparseml.layouts`), build a curvature estimate per part (reused across a one-shot sweep),
score every part, gather the scores, pick the masks, update every part, gather the new weights
and masks, write them back. `run_block_step` does all of it for any *method*: an object with

- ``part_scores(part, w, est, pruned) -> Tensor``: (c,) scores of the part's weights, higher =
  keep (entries of ``pruned`` are set to -inf afterwards in any case);
- ``part_update(part, w, est, kept, new) -> Tensor | (Tensor, Tensor) | None``: the part's new
  weights after removing ``new``, optionally with its own keep-mask (CAP's order prefixes);
  None leaves the kept weights as they are (a score-only pruner);

where ``w`` is the part's flattened weights in the work dtype, ``est`` its curvature estimate
and ``kept`` / ``pruned`` / ``new`` boolean masks of the part. `BlockPruningModifier` wires the
skeleton into a recipe modifier: a new pruner subclasses it and defines ``part_scores``,
``part_update`` and, when it needs another estimate than the block inverse Fisher,
``estimate(module, layout)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparseml.curvature import block_fisher_inverses
from sparseml.dist import on_all_ranks
from sparseml.layouts import BlockLayout, BlockPart
from sparseml.masks import create_masks
from sparseml.modifiers.second_order import SecondOrderPruningModifier


def _finish(w: Tensor, update: Tensor | None, keep: Tensor, scale: float) -> Tensor:
    """The part's written weights: ``scale`` of the update's change, zeros off ``keep``."""
    if update is None or scale == 0.0:
        out = w
    elif scale == 1.0:
        out = update.to(w.device, w.dtype)
    else:
        out = w + scale * (update.to(w.device, w.dtype) - w)
    return out.masked_fill(~keep, 0.0)


@torch.no_grad()
def run_block_step(pruner, method, layout, estimates: list[Any], targets: list[float]) -> None:
    """One pruning step of ``method`` over ``pruner``'s parameters (see the module docstring).

    ``pruner`` provides ``refs``, ``masks``, ``flat_weights()``, ``work_dtype``,
    ``select_masks(scores, targets)``, ``write_weights(i, flat)``, ``set_masks(masks)`` and
    an optional ``scale_prune_update`` (default 1: the full update; 0: scores only).
    Every local computation runs under `on_all_ranks`, so a failure on one rank fails all.
    """
    owner, parts = type(pruner).__name__, layout.parts
    device, dtype = pruner.refs[0].param.device, pruner.work_dtype
    weights = layout.take(pruner.flat_weights())
    kept = layout.take([m.reshape(-1) for m in pruner.masks])

    def local_scores() -> list[Tensor]:
        return [
            method.part_scores(p, w, e, ~k) for p, w, e, k in zip(parts, weights, estimates, kept)
        ]

    gathered = layout.gather(on_all_ranks(local_scores, owner), device, dtype)
    scores = [s.view_as(r.param) for s, r in zip(gathered, pruner.refs)]
    chosen = layout.take([m.reshape(-1) for m in pruner.select_masks(scores, targets)])
    scale = float(getattr(pruner, "scale_prune_update", 1.0))

    def local_updates() -> tuple[list[Tensor], list[Tensor]]:
        new_w, new_k = [], []
        for p, w, e, k, c in zip(parts, weights, estimates, kept, chosen):
            keep = k & c.to(k.device)
            result = method.part_update(p, w, e, k, k & ~keep)
            if isinstance(result, tuple):
                result, keep = result[0], result[1].to(k.device) & k
            new_w.append(_finish(w, result, keep.to(w.device), scale))
            new_k.append(keep.float())
        return new_w, new_k

    new_w, new_k = on_all_ranks(local_updates, owner)
    for i, flat in enumerate(layout.gather(new_w, device, dtype)):
        pruner.write_weights(i, flat)
    keeps = layout.gather(new_k, device)
    pruner.set_masks([k.view(r.param.shape) > 0.5 for k, r in zip(keeps, pruner.refs)])


class BlockPruningModifier(SecondOrderPruningModifier):
    """Base of the part-wise pruners (not usable in a recipe by itself): block layout, block
    inverse Fisher, `run_block_step`; subclasses define ``part_scores`` and ``part_update``."""

    def block_layout(self) -> BlockLayout:
        return BlockLayout([r.param.numel() for r in self.refs], self.fisher_block_size)

    def estimate(self, module: nn.Module, layout) -> list[Any]:
        """Per part: H (n_b, B, B), the damped block inverse empirical Fisher."""
        return block_fisher_inverses(
            self.gradient_chunks(module),
            layout,
            num_grads=self.num_grads,
            damp=self.damp,
            devices=[self.fisher_device(r.param) for r in self.refs],
            dtype=self.work_dtype,
            owner=type(self).__name__,
        )

    def select_masks(self, scores: list[Tensor], targets: list[float]) -> list[Tensor]:
        return create_masks(
            self.masked_scores(scores), targets, self.mask_spec, self.global_sparsity
        )

    def prune_step(self, module: nn.Module, targets: list[float]) -> None:
        if not self.refs:
            return
        layout = self.block_layout()
        with self.timed("curvature"):
            estimates = self.cached("curvature", lambda: self.estimate(module, layout))
        with self.timed("pruning"):
            run_block_step(self, self, layout, estimates, targets)

    def part_scores(self, part: BlockPart, w: Tensor, est: Any, pruned: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} does not define part_scores")

    def part_update(
        self, part: BlockPart, w: Tensor, est: Any, kept: Tensor, new: Tensor
    ) -> Tensor | tuple[Tensor, Tensor] | None:
        return None
