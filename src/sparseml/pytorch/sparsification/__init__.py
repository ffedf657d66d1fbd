"""``from sparseml.pytorch.sparsification import <ModifierClass>``."""

from sparseml.manager import ScheduledModifierManager
from sparseml.registry import modifier_classes

globals().update(modifier_classes())

__all__ = ["ScheduledModifierManager", *modifier_classes()]
