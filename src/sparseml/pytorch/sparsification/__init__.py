"""``from sparseml.pytorch.sparsification import <ModifierClass>``."""

from sparseml import modifiers as _modifiers
from sparseml.manager import ScheduledModifierManager
from sparseml.registry import modifier_names

for _name in modifier_names():
    globals()[_name] = getattr(_modifiers, _name)

__all__ = ["ScheduledModifierManager", *modifier_names()]
