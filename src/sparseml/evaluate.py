"""A safe arithmetic evaluator for recipe ``eval(...)`` expressions (no Python ``eval``).

Allowed: int/float literals, names of numeric recipe variables, ``+ - * / // % **``, unary
``+``/``-``, and calls to ``abs float int min max round``.
"""

from __future__ import annotations

import ast
import operator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_CALLS = {"abs": abs, "float": float, "int": int, "min": min, "max": max, "round": round}


class UnknownVariableError(KeyError):
    """An expression names a variable the recipe does not define."""

    def __str__(self) -> str:
        return str(self.args[0])


def safe_eval(expression: str, variables: dict[str, float]) -> int | float:
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"syntax error: {err.msg}") from None
    result = _eval(tree.body, variables)
    if isinstance(result, bool) or not isinstance(result, (int, float)):
        raise ValueError("the result is not a number")
    return result


def _eval(node: ast.AST, variables: dict[str, float]) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in variables:
            raise UnknownVariableError(node.id)
        return variables[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, variables), _eval(node.right, variables))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, variables))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
        args = [_eval(a, variables) for a in node.args]
        kwargs = {k.arg: _eval(k.value, variables) for k in node.keywords if k.arg}
        return _CALLS[node.func.id](*args, **kwargs)
    raise ValueError(f"{type(node).__name__} is not allowed (arithmetic on numbers only)")
