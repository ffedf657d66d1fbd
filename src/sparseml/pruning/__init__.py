"""Pruning as composition: estimators x selectors x methods, run by one step skeleton.

- `sparseml.pruning.modifier`: `PruningModifier`, the one base (parameters, schedule, masks,
  state, the step skeleton);
- `sparseml.pruning.estimators`: curvature estimates, each with its layout, memory and build;
- `sparseml.pruning.selectors`: scores and targets to masks (global, per layer, N:M, blocks,
  FLOPs, per-layer targets from another selector);
- `sparseml.pruning.updates`: part-wise and matrix-free scores and weight updates;
- `sparseml.pruning.methods`: the built-in pruners, one file each;
- `sparseml.pruning.fields`: the field groups pruners share, `flops_plan`: FLOPs-aware fields.

docs/architecture.md draws the whole picture; docs/adding-a-pruner.md adds a pruner.
"""

from sparseml.pruning.modifier import PruningModifier

__all__ = ["PruningModifier"]
