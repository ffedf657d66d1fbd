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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparseml.errors import RecipeError
from sparseml.evaluate import UnknownVariableError, safe_eval
from sparseml.registry import get_modifier_class

_FRONT_MATTER = re.compile(r"^\s*(?:---|\+\+\+)(.*?)(?:---|\+\+\+)", re.MULTILINE | re.DOTALL)
_EVAL = re.compile(r"^\s*eval\((.*)\)\s*$", re.DOTALL)


@dataclass
class TaggedNode:
    """A ``!Tag`` mapping read from YAML, not yet turned into a modifier."""

    tag: str
    args: dict[str, Any] = field(default_factory=dict)
    line: int = 0


class _RecipeLoader(yaml.SafeLoader):
    """Safe loader in which any local ``!Tag`` becomes a ``TaggedNode`` placeholder."""


def _construct_tagged(loader: _RecipeLoader, suffix: str, node: yaml.Node) -> TaggedNode:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        args = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.ScalarNode) and node.value == "":
        args = {}
    else:
        raise RecipeError(f"line {line}: tag !{suffix} must be applied to a mapping of fields")
    return TaggedNode(suffix, dict(args), line)


_RecipeLoader.add_multi_constructor("!", _construct_tagged)


def read_recipe_text(source: str | Path) -> tuple[str, str]:
    """Return ``(yaml_text, recipe_name)`` for a path or raw recipe text."""
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise RecipeError(f"a recipe must be a file path or YAML text, got {type(source).__name__}")
    if source.startswith("zoo:"):
        raise RecipeError(
            f"recipe {source!r}: SparseZoo stubs are not supported (no network access and "
            "SparseZoo is deprecated); download the recipe file and pass its path"
        )
    if "\n" in source or "\r" in source:
        found = _FRONT_MATTER.search(source)
        return (found.group(1) if found else source), "<text>"
    path = Path(source)
    if path.suffix.lower() not in (".yaml", ".yml", ".md"):
        raise RecipeError(f"recipe {source!r}: expected a .yaml, .yml or .md file")
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(f"recipe {source!r} cannot be read: {err.strerror or err}") from None
    if path.suffix.lower() == ".md":
        found = _FRONT_MATTER.search(text)
        if not found:
            raise RecipeError(f"recipe {source!r}: no YAML front matter (--- ... ---) found")
        text = found.group(1)
    return text, str(path)


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
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"recipe_variables is not valid JSON: {err}") from None
        return dict(parsed)
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        found = re.fullmatch(r"([^=:{}!]+?)\s*[=:]\s*(.*)", item)
        if not found:
            raise RecipeError(f"recipe_variables entry {item!r} is not of the form key=value")
        key, value = found.group(1), found.group(2)
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _is_group_key(key: Any, value: Any) -> bool:
    return isinstance(key, str) and "modifiers" in key and isinstance(value, list)


def _apply_overrides(data: dict, overrides: dict[str, Any], name: str) -> None:
    for key, value in overrides.items():
        if key not in data or isinstance(data[key], list):
            variables = [k for k, v in data.items() if not _is_group_key(k, v)]
            raise RecipeError(
                f"recipe {name}: recipe_variables key {key!r} is not a top-level variable "
                f"of the recipe (variables: {', '.join(map(str, variables)) or 'none'})"
            )
        data[key] = value


def _eval_string(value: str, numeric: dict, other: dict, where: str) -> Any:
    found = _EVAL.match(value)
    if not found:
        return value
    expr = found.group(1).strip()
    if expr in other:
        return other[expr]
    try:
        return safe_eval(expr, numeric)
    except UnknownVariableError as err:
        raise RecipeError(f"{where}: eval({expr}) uses unknown variable {err}") from None
    except ValueError as err:
        raise RecipeError(f"{where}: eval({expr}) is not allowed: {err}") from None


def _resolve_variables(data: dict, name: str) -> tuple[dict, dict]:
    numeric = {
        k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    pending = {k: v for k, v in data.items() if isinstance(v, str) and _EVAL.match(v)}
    while pending:
        progressed = False
        for key, text in list(pending.items()):
            try:
                numeric[key] = _eval_string(text, numeric, {}, f"recipe {name}, variable {key}")
            except RecipeError:
                continue
            data[key] = numeric[key]
            del pending[key]
            progressed = True
        if not progressed:
            key, text = next(iter(pending.items()))
            _eval_string(text, numeric, {}, f"recipe {name}, variable {key}")  # raises the reason
            raise RecipeError(f"recipe {name}: variable {key} = {text} cannot be resolved (cycle?)")
    other = {
        k: v
        for k, v in data.items()
        if k not in numeric and not _is_group_key(k, v) and not isinstance(v, TaggedNode)
    }
    return numeric, other


def _eval_tree(value: Any, numeric: dict, other: dict, where: str) -> Any:
    if isinstance(value, str):
        return _eval_string(value, numeric, other, where)
    if isinstance(value, list):
        return [_eval_tree(v, numeric, other, where) for v in value]
    if isinstance(value, dict):
        return {k: _eval_tree(v, numeric, other, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, TaggedNode):
        value.args = {
            k: _eval_tree(v, numeric, other, f"{where} field {k}") for k, v in value.args.items()
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
                    f"recipe {name}: modifiers under key {key!r}; modifier lists must be under a "
                    "top-level key whose name contains 'modifiers' (e.g. pruning_modifiers)"
                )
            elif isinstance(value, dict) and any(_is_group_key(k, v) for k, v in value.items()):
                raise RecipeError(
                    f"recipe {name}: staged recipes (stage {key!r}) are not supported"
                )
    else:
        nodes = []
    bad = [n for n in nodes if not isinstance(n, TaggedNode)]
    if bad:
        raise RecipeError(
            f"recipe {name}: modifier list entry {bad[0]!r} is not a !Modifier mapping"
        )
    if not nodes:
        raise RecipeError(f"recipe {name}: no modifiers found")
    return nodes


def load_modifiers(source: str | Path, recipe_variables: Any = None) -> list:
    """Construct the modifiers of a recipe, in file order."""
    text, name = read_recipe_text(source)
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - safe loader subclass
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {name} is not valid YAML: {err}") from None
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
        where = f"recipe {name}, modifier #{index} !{node.tag} (line {node.line})"
        _eval_tree(node, numeric, other, where)
        try:
            modifiers.append(get_modifier_class(node.tag)(**node.args))
        except RecipeError as err:
            raise RecipeError(f"{where}: {err}") from None
    return modifiers


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
