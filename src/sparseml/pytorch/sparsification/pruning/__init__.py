"""``from sparseml.pytorch.sparsification.pruning import <PruningModifierClass>``."""

from sparseml import modifiers as _modifiers
from sparseml.registry import modifier_names

for _name in modifier_names():
    if _name.endswith("PruningModifier"):
        globals()[_name] = getattr(_modifiers, _name)

__all__ = [n for n in modifier_names() if n.endswith("PruningModifier")]
