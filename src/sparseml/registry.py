"""Modifier registry keyed by the SparseML class names used as recipe tags (``!ClassName``)."""

from __future__ import annotations

from typing import TypeVar

from sparseml.errors import RecipeError, close_matches

_MODIFIERS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_modifier(cls: T) -> T:
    """Class decorator: make ``cls`` constructible from a recipe tag ``!<cls.__name__>``."""
    name = cls.__name__
    if name in _MODIFIERS and _MODIFIERS[name] is not cls:
        raise RuntimeError(f"modifier {name} is registered twice")
    _MODIFIERS[name] = cls
    return cls


def _ensure_loaded() -> None:
    import sparseml.modifiers  # noqa: F401  (registers the training and quantization modifiers)
    import sparseml.pruning.methods  # noqa: F401  (registers the pruners)


def modifier_names() -> list[str]:
    _ensure_loaded()
    return sorted(_MODIFIERS)


def modifier_classes() -> dict[str, type]:
    """Every registered modifier class by recipe tag name."""
    _ensure_loaded()
    return dict(sorted(_MODIFIERS.items()))


def get_modifier_class(tag: str) -> type:
    """Class for recipe tag ``tag`` (``Name``, ``!Name`` or ``!pytorch.Name``)."""
    _ensure_loaded()
    name = tag.lstrip("!")
    if name.startswith("pytorch."):
        name = name[len("pytorch.") :]
    if name not in _MODIFIERS:
        shown = name if len(name) <= 80 else f"{name[:80]}..."  # tags come from user input
        raise RecipeError(
            f"unknown modifier tag !{shown}{close_matches(name, _MODIFIERS)}; "
            f"known modifiers: {', '.join(sorted(_MODIFIERS))}"
        )
    return _MODIFIERS[name]
