"""``from sparseml.pytorch.sparsification.pruning import <PruningModifierClass>``."""

from sparseml.registry import modifier_classes

_PRUNING = {k: v for k, v in modifier_classes().items() if k.endswith("PruningModifier")}
globals().update(_PRUNING)

__all__ = list(_PRUNING)
