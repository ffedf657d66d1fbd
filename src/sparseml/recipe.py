"""Reading, validating and writing SparseML-style YAML recipes.

A recipe is YAML (a ``.yaml``/``.yml`` file, the front matter of a ``.md`` file, or raw text).
Modifiers are written as local tags, ``- !GMPruningModifier`` followed by its fields. Top-level
keys whose name contains ``modifiers`` and hold a list are modifier groups; other top-level keys
are variables, usable in any field as ``eval(<arithmetic expression>)``. Only registered tags
construct objects: the YAML is read with a safe loader.
"""

from __future__ import annotations

import json
import re
from collections import deque
from pathlib import Path
from typing import Any

import yaml

from sparseml.errors import RecipeError
from sparseml.evaluate import (
    ExpressionError,
    UnknownVariableError,
    referenced_names,
    safe_eval,
)
from sparseml.fields import brief
from sparseml.recipe_source import TaggedNode, clip, load_yaml, read_recipe_text
from sparseml.registry import get_modifier_class

__all__ = ["TaggedNode", "dump_modifiers", "load_modifiers", "read_recipe_text"]

MAX_ERROR_CHARS = 1000  # any error leaving load_modifiers, whatever it echoes

_EVAL = re.compile(r"^\s*eval\((.*)\)\s*$", re.DOTALL)


def parse_recipe_variables(values: Any) -> dict[str, Any]:
    """``recipe_variables`` as a dict: None, a dict, a JSON object or ``k=v,k2=v2`` text."""
    if values is None:
        return {}
    if isinstance(values, dict):
        return dict(values)
    if not isinstance(values, str):
        raise RecipeError("recipe_variables must be a dict, JSON text or 'key=value,...' text")
    text = values.strip()
    if text.startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as err:
            raise RecipeError(f"recipe_variables is not valid JSON: {err}") from None
        except RecursionError:
            raise RecipeError("recipe_variables JSON is nested too deeply") from None
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        cuts = [i for i in (item.find("="), item.find(":")) if i >= 0]
        cut = min(cuts, default=-1)
        key, value = item[:cut].strip(), item[cut + 1 :].strip()
        if cut < 0 or not key or any(c in key for c in "{}!"):
            raise RecipeError(f"recipe_variables entry {brief(item)} is not of the form key=value")
        if key in out:
            raise RecipeError(f"recipe_variables key {brief(key)} is given twice")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RecipeError(f"recipe_variables key {brief(key)} is given twice")
        out[key] = value
    return out


def _is_group_key(key: Any, value: Any) -> bool:
    return isinstance(key, str) and "modifiers" in key and isinstance(value, list)


def _apply_overrides(data: dict, overrides: dict[str, Any], name: str) -> None:
    for key, value in overrides.items():
        if key not in data or isinstance(data[key], list):
            variables = [str(k) for k, v in data.items() if not _is_group_key(k, v)]
            raise RecipeError(
                f"recipe {name}: recipe_variables key {brief(key)} is not a top-level variable "
                f"of the recipe (variables: {clip(', '.join(variables), 300) or 'none'})"
            )
        data[key] = value


def _eval_string(value: str, numeric: dict, other: dict, where: str) -> Any:
    found = _EVAL.match(value)
    if not found:
        return value
    expr = found.group(1).strip()
    if expr in other:
        return other[expr]
    shown = f"eval({clip(expr)})"
    try:
        return safe_eval(expr, numeric)
    except UnknownVariableError as err:
        raise RecipeError(f"{where}: {shown} uses unknown variable {clip(str(err))}") from None
    except ExpressionError as err:
        raise RecipeError(f"{where}: {shown} cannot be evaluated: {err}") from None
    except ValueError as err:
        raise RecipeError(f"{where}: {shown} is not allowed: {err}") from None


def _resolve_variables(data: dict, name: str) -> tuple[dict, dict]:
    """Evaluate the top-level ``eval(...)`` variables, each after the variables it uses."""
    numeric = {
        k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    pending = {k: v for k, v in data.items() if isinstance(v, str) and _EVAL.match(v)}
    for key in _dependency_order(pending, name):
        where = f"recipe {name}, variable {clip(str(key))}"
        numeric[key] = _eval_string(pending[key], numeric, {}, where)
        data[key] = numeric[key]
    other = {
        k: v
        for k, v in data.items()
        if k not in numeric and not _is_group_key(k, v) and not isinstance(v, TaggedNode)
    }
    return numeric, other


def _dependency_order(pending: dict[Any, str], name: str) -> list:
    """Keys of ``pending`` with every variable before those that use it (linear time: a
    recipe of many chained variables must not need one pass per variable)."""
    uses = {}
    for key, text in pending.items():
        expr = _EVAL.match(text).group(1)  # type: ignore[union-attr]
        uses[key] = {n for n in referenced_names(expr) if n in pending}
    users: dict[Any, list] = {key: [] for key in pending}
    for key, names in uses.items():
        for used in names:
            users[used].append(key)
    waiting = {key: len(names) for key, names in uses.items()}
    ready = deque(key for key, count in waiting.items() if count == 0)  # file order first
    order = []
    while ready:
        key = ready.popleft()
        order.append(key)
        for user in users[key]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if len(order) < len(pending):
        cycle = [str(k) for k in pending if waiting[k] > 0]
        raise RecipeError(
            f"recipe {name}: variables that depend on each other in a cycle: "
            f"{clip(', '.join(cycle), 200)}"
        )
    return order


def _eval_tree(value: Any, numeric: dict, other: dict, where: str) -> Any:
    if isinstance(value, str):
        return _eval_string(value, numeric, other, where)
    if isinstance(value, list):
        return [_eval_tree(v, numeric, other, where) for v in value]
    if isinstance(value, dict):
        return {
            k: _eval_tree(v, numeric, other, f"{where}.{clip(str(k))}") for k, v in value.items()
        }
    if isinstance(value, TaggedNode):
        value.args = {
            k: _eval_tree(v, numeric, other, f"{where} field {clip(str(k))}")
            for k, v in value.args.items()
        }
    return value


def _collect_nodes(data: Any, name: str) -> list[TaggedNode]:
    if isinstance(data, TaggedNode):
        return [data]
    if isinstance(data, list):
        nodes = data
    elif isinstance(data, dict):
        nodes = []
        for key, value in data.items():
            if _is_group_key(key, value):
                nodes.extend(value)
            elif isinstance(value, TaggedNode):
                nodes.append(value)
            elif isinstance(value, list) and any(isinstance(v, TaggedNode) for v in value):
                raise RecipeError(
                    f"recipe {name}: modifiers under key {brief(key)}; modifier lists must be under a "
                    "top-level key whose name contains 'modifiers' (e.g. pruning_modifiers)"
                )
            elif isinstance(value, dict) and any(_is_group_key(k, v) for k, v in value.items()):
                raise RecipeError(
                    f"recipe {name}: staged recipes (stage {brief(key)}) are not supported"
                )
    else:
        nodes = []
    bad = [n for n in nodes if not isinstance(n, TaggedNode)]
    if bad:
        raise RecipeError(
            f"recipe {name}: modifier list entry {brief(bad[0])} is not a !Modifier mapping"
        )
    if not nodes:
        raise RecipeError(f"recipe {name}: no modifiers found")
    return nodes


def load_modifiers(source: str | Path, recipe_variables: Any = None) -> list:
    """Construct the modifiers of a recipe, in file order."""
    try:
        return _load_modifiers(source, recipe_variables)
    except RecipeError as err:
        # The last guard on size: messages quote recipe input, which may be huge.
        message = str(err)
        if len(message) <= MAX_ERROR_CHARS:
            raise
        raise RecipeError(clip(message, MAX_ERROR_CHARS)) from None


def _load_modifiers(source: str | Path, recipe_variables: Any) -> list:
    text, name = read_recipe_text(source)
    data = load_yaml(text, name)
    overrides = parse_recipe_variables(recipe_variables)
    if isinstance(data, dict):
        _apply_overrides(data, overrides, name)
        numeric, other = _resolve_variables(data, name)
    elif overrides:
        raise RecipeError(f"recipe {name}: recipe_variables need a recipe with top-level variables")
    else:
        numeric, other = {}, {}
    modifiers = []
    for index, node in enumerate(_collect_nodes(data, name)):
        where = f"recipe {name}, modifier #{index} !{clip(node.tag)} (line {node.line})"
        _eval_tree(node, numeric, other, where)
        try:
            cls = get_modifier_class(node.tag)
            if not node.args:
                raise _empty_modifier_error(cls)
            keys = [k for k in node.args if not isinstance(k, str)]
            if keys:  # YAML reads `on:`, `1:` and `~:` as a bool, an int and null
                raise RecipeError(
                    f"field name {keys[0]!r} is a {type(keys[0]).__name__}, not a name; fields "
                    f"of {cls.__name__}: {', '.join(cls.fields)}"
                )
            modifiers.append(cls(**node.args))
        except RecipeError as err:
            raise RecipeError(f"{where}: {err}") from None
    return modifiers


def _empty_modifier_error(cls: type) -> RecipeError:
    # Every field then has its default, which for most modifiers means doing nothing (a pruning
    # modifier prunes to final_sparsity 0.0): refuse instead of running a silent no-op.
    required = ", ".join(cls.required_fields()) or "none"
    return RecipeError(
        "no fields given; an empty modifier would run on defaults alone "
        f"(required fields: {required}; fields: {', '.join(cls.fields)})"
    )


def dump_modifiers(modifiers: list, metadata: dict | None = None) -> str:
    """Recipe text that loads back to modifiers equal to ``modifiers``."""
    lines = ["version: 1.1.0", ""]
    if metadata:
        lines += [yaml.safe_dump({"__metadata__": metadata}, sort_keys=True).rstrip(), ""]
    lines.append("modifiers:")
    for mod in modifiers:
        body = str(mod).splitlines()
        lines.append(f"  - {body[0]}")
        lines += [f"  {line}" for line in body[1:]]
    return "\n".join(lines) + "\n"
