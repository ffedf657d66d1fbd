"""A safe arithmetic evaluator for recipe ``eval(...)`` expressions (no Python ``eval``).

Allowed: int/float literals, names of numeric recipe variables, ``+ - * / // % **``, unary
``+``/``-``, and calls to ``abs float int min max round``.

Every evaluation is bounded so that hostile input fails at once instead of hanging: the
expression length and nesting depth are capped, a power is refused *before* it is computed when
its result would leave the float range, and every intermediate result must be a finite number
within that range (Python ints are unbounded, so ``9**9**9`` would otherwise run for hours).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 50
# No recipe field needs a number beyond the float range; capping ints there keeps every
# operation on them cheap.
MAX_INT_BITS = 1024
MAX_ROUND_DIGITS = 400  # round(x, n) for int x computes 10**|n|

Number = int | float


class ExpressionError(ValueError):
    """An allowed expression that cannot be evaluated (division by zero, overflow, bad call)."""


class UnknownVariableError(KeyError):
    """An expression names a variable the recipe does not define."""

    def __str__(self) -> str:
        return str(self.args[0])


def _pow(base: Number, exp: Number) -> Number:
    # Only int ** positive int is slow (exact big-int result); float powers overflow at once.
    big_int = isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1
    if big_int and (exp > MAX_INT_BITS or exp * math.log2(abs(base)) > MAX_INT_BITS):
        raise ExpressionError(f"a power is too large (result over 2**{MAX_INT_BITS})")
    return operator.pow(base, exp)


def _round(number: Number, ndigits: Any = None) -> Number:
    if isinstance(ndigits, int) and abs(ndigits) > MAX_ROUND_DIGITS:
        raise ExpressionError(f"round() ndigits must be within +-{MAX_ROUND_DIGITS}")
    return round(number, ndigits)


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_CALLS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "float": float,
    "int": int,
    "min": min,
    "max": max,
    "round": _round,
}


def _parse(expression: str) -> ast.Expression:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        return ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"syntax error: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError("expression is nested too deeply") from None


def referenced_names(expression: str) -> set[str]:
    """Variable names an expression uses (empty when it does not parse: eval reports that)."""
    try:
        tree = _parse(expression)
    except ValueError:
        return set()
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def safe_eval(expression: str, variables: dict[str, Any]) -> Number:
    """Value of ``expression``; ``ValueError`` (``ExpressionError`` when evaluation fails) or
    ``UnknownVariableError`` with a reason otherwise."""
    result = _eval(_parse(expression).body, variables, 0)
    if isinstance(result, bool) or not isinstance(result, (int, float)):
        raise ValueError("the result is not a number")
    return result


def _checked(value: Any) -> Any:
    """``value`` if it is a usable number: finite and within the float range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, complex):
            raise ExpressionError("the result is not a real number")
        return value  # not a number: safe_eval rejects it at the end
    if isinstance(value, float) and not math.isfinite(value):
        raise ExpressionError(f"the result is {value} (overflow or an infinite literal)")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ExpressionError(f"a value is too large (over 2**{MAX_INT_BITS})")
    return value


def _eval(node: ast.AST, variables: dict[str, Any], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"expression is nested deeper than {MAX_DEPTH} levels")
    depth += 1
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.Name):
        if node.id not in variables:
            raise UnknownVariableError(node.id)
        return _checked(variables[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _eval(node.left, variables, depth)
        right = _eval(node.right, variables, depth)
        return _apply(_BINARY[type(node.op)], left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _apply(_UNARY[type(node.op)], _eval(node.operand, variables, depth))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            raise ValueError("* and ** arguments are not allowed")
        args = [_eval(a, variables, depth) for a in node.args]
        kwargs = {k.arg: _eval(k.value, variables, depth) for k in node.keywords if k.arg}
        return _apply(_CALLS[node.func.id], *args, name=node.func.id, **kwargs)
    raise ValueError(f"{type(node).__name__} is not allowed (arithmetic on numbers only)")


def _apply(func: Callable[..., Any], *args: Any, name: str = "", **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` with Python's arithmetic and call errors as ``ExpressionError``."""
    try:
        return _checked(func(*args, **kwargs))
    except ExpressionError:
        raise
    except ZeroDivisionError:
        raise ExpressionError("division by zero") from None
    except OverflowError:
        raise ExpressionError("numeric overflow") from None
    except (TypeError, ValueError) as err:
        where = f"{name}(): " if name else ""
        raise ExpressionError(f"{where}{err}") from None
