"""Recipe source: from a path or text to the YAML document, refusing input that would
silently lose data or blow up.

Text comes from a ``.yaml``/``.yml`` file, the front matter of a ``.md`` file, or a string; it
is capped at ``MAX_RECIPE_BYTES`` (recipes are a few kilobytes; the cap keeps every later pass
cheap) and files must be regular files (a FIFO or device could block forever).

Only registered-looking local tags (``!Name``) construct anything, and only placeholders
(``TaggedNode``); every other non-standard tag is an error, as with ``yaml.safe_load``. Before
anything is constructed, the composed node graph is inspected once:

- duplicate keys in a mapping are refused (YAML keeps the last silently, so a recipe with two
  ``pruning_modifiers:`` groups would drop the first);
- the size of the document *with aliases expanded* is capped, so an alias bomb ("billion
  laughs": a few lines whose aliases expand to 10^9 nodes) fails at once instead of taking
  minutes and gigabytes in the later passes and error messages;
- an alias that refers to a node containing it (a recursive structure) is refused.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparseml.errors import RecipeError
from sparseml.fields import brief

MAX_RECIPE_BYTES = 1 << 20
# YAML values, counted while composing and again with aliases expanded; real recipes have a
# few hundred, and pure-Python PyYAML composes about 30k per second.
MAX_NODES = 20_000
MAX_MESSAGE_CHARS = 300  # of a YAML parser message (it may quote input)
_MERGE_TAG = "tag:yaml.org,2002:merge"
# [ \t]* and not \s*: \s* also eats newlines, which made the search quadratic on blank lines.
# Front matter: from a line that is only ``---`` (or ``+++``) to the next line that is only the
# same marker; a marker inside a line (a ``# ---- pruning ----`` comment) neither opens nor ends it.
_FRONT_MATTER = re.compile(
    r"^[ \t]*(---|\+\+\+)[ \t]*\r?\n(.*?)^[ \t]*\1[ \t]*\r?$", re.MULTILINE | re.DOTALL
)


@dataclass
class TaggedNode:
    """A ``!Tag`` mapping read from YAML, not yet turned into a modifier."""

    tag: str
    args: dict[str, Any] = field(default_factory=dict)
    line: int = 0


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _RecipeLoader(yaml.SafeLoader):
    """Safe loader in which any local ``!Tag`` becomes a ``TaggedNode`` placeholder."""

    composed = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.composed += 1
        if self.composed > MAX_NODES:
            raise RecipeError(
                f"line {self.peek_event().start_mark.line + 1}: the recipe has more than "
                f"{MAX_NODES} YAML values; a recipe needs a few hundred"
            )
        return super().compose_node(parent, index)

    def construct_document(self, node: yaml.Node) -> Any:
        _Inspection(self).size(node)
        return super().construct_document(node)


def _construct_tagged(loader: _RecipeLoader, suffix: str, node: yaml.Node) -> TaggedNode:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        args = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.ScalarNode) and node.value == "":
        args = {}
    else:
        raise RecipeError(
            f"line {line}: tag !{clip(suffix)} must be applied to a mapping of fields"
        )
    return TaggedNode(suffix, dict(args), line)


_RecipeLoader.add_multi_constructor("!", _construct_tagged)


class _Inspection:
    """One pass over the composed graph: expanded size, recursive aliases, duplicate keys.

    Sizes are memoized per node, so the pass is linear in the *composed* (unexpanded) size.
    """

    def __init__(self, loader: _RecipeLoader) -> None:
        self.loader = loader
        self.sizes: dict[int, int] = {}
        self.open: set[int] = set()

    def size(self, node: yaml.Node) -> int:
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.open:
            raise RecipeError(
                f"line {node.start_mark.line + 1}: an alias refers to a node that contains it "
                "(a recursive structure is not a recipe)"
            )
        self.open.add(key)
        if isinstance(node, yaml.MappingNode):
            self.check_duplicate_keys(node)
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total += self.size(child)
            if total > MAX_NODES:
                raise RecipeError(
                    f"line {node.start_mark.line + 1}: the recipe expands to more than "
                    f"{MAX_NODES} YAML values (aliases repeating data, e.g. an alias bomb); "
                    "a recipe needs a few hundred"
                )
        self.open.discard(key)
        self.sizes[key] = total
        return total

    def check_duplicate_keys(self, node: yaml.MappingNode) -> None:
        # Keys are compared as constructed values (1 and 1.0 are the same dict key), on the
        # node as written: merge keys (<<) may legitimately be overridden.
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: the constructor reports it
                continue
            if first is not None:
                raise RecipeError(
                    f"line {line}: key {brief(key)} is given twice (first on line {first}); "
                    "YAML would silently keep only the last value"
                )
            seen[key] = line


def yaml_error_line(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem, where it is (1-based line and column), and
    what it was reading (its own message spans several lines and quotes the text)."""
    problem = getattr(err, "problem", None)
    if not problem:
        return clip(" ".join(str(err).split()), MAX_MESSAGE_CHARS)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(err, "context", None)
    return clip(f"{problem}{where}" + (f" ({context})" if context else ""), MAX_MESSAGE_CHARS)


def load_yaml(text: str, name: str) -> Any:
    """The YAML document ``text`` of recipe ``name``, with ``!Tag`` mappings as TaggedNodes."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - safe loader subclass
    except RecipeError as err:
        raise RecipeError(f"recipe {name}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {name} is not valid YAML: {yaml_error_line(err)}") from None
    except RecursionError:
        raise RecipeError(f"recipe {name}: the YAML is nested too deeply") from None
    except (ValueError, OverflowError) as err:  # e.g. an int literal of 5000 digits
        message = clip(str(err), MAX_MESSAGE_CHARS)
        raise RecipeError(f"recipe {name}: a YAML value cannot be read: {message}") from None


def read_recipe_text(source: str | Path) -> tuple[str, str]:
    """Return ``(yaml_text, recipe_name)`` for a path or raw recipe text."""
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise RecipeError(f"a recipe must be a file path or YAML text, got {type(source).__name__}")
    if source.startswith("zoo:"):
        raise RecipeError(
            f"recipe {brief(source)}: SparseZoo stubs are not supported (no network access and "
            "SparseZoo is deprecated); download the recipe file and pass its path"
        )
    if "\n" in source or "\r" in source:
        _check_size(len(source), "recipe text", "characters")
        found = _FRONT_MATTER.search(source)
        return (found.group(2) if found else source), "<text>"
    path = Path(source)
    shown = brief(source)
    if path.suffix.lower() not in (".yaml", ".yml", ".md"):
        raise RecipeError(f"recipe {shown}: expected a .yaml, .yml or .md file")
    text = _read_file(path, shown)
    if path.suffix.lower() == ".md":
        found = _FRONT_MATTER.search(text)
        if not found:
            raise RecipeError(f"recipe {shown}: no YAML front matter (--- ... ---) found")
        text = found.group(2)
    return text, clip(str(path), 200)


def _check_size(size: int, what: str, unit: str = "bytes") -> None:
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{what} is {size} {unit}; recipes are limited to {MAX_RECIPE_BYTES}")


def _read_file(path: Path, shown: str) -> str:
    try:
        info = path.stat()
        # Only regular files: reading a FIFO or a device could block or never end.
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError(f"recipe {shown} is not a regular file")
        _check_size(info.st_size, f"recipe {shown}")
        with path.open("rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(f"recipe {shown} cannot be read: {err.strerror or err}") from None
    _check_size(len(data), f"recipe {shown}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {shown} is not UTF-8 text (byte {err.start})") from None
