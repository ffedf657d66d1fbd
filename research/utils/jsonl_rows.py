"""Reading a JSONL file of result rows line by line: the rows, and for each line that holds
none (cut short by a kill, not JSON, or a field the code reads missing or of the wrong type, e.g.
edited by hand) its number and why, for the caller to drop and report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Fields read back from the rows besides method and sparsity: a number or null when present.
_NUMERIC = ("accuracy", "top5", "loss", "samples", "measured_sparsity", "prunable_sparsity")
_NUMERIC += ("seconds", "eval_seconds", "peak_mem_mb", "world_size")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def row_problem(row: Any) -> str | None:
    """Why ``row`` (a parsed line of ``results.jsonl``) is no result row, or None: every field
    the sweep, the table and the plot read, with its type."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("method"), str) or not row["method"]:
        return f"'method' is {row.get('method')!r}, expected a method name"
    sparsity = row.get("sparsity")
    if not _is_number(sparsity) or not 0 <= sparsity <= 1:
        return f"'sparsity' is {sparsity!r}, expected a number from 0 to 1"
    for key in _NUMERIC:
        if row.get(key) is not None and not _is_number(row[key]):
            return f"{key!r} is {row[key]!r}, expected a number or null"
    if row.get("settings") is not None and not isinstance(row["settings"], dict):
        return f"'settings' is {row['settings']!r}, expected an object"
    return None


def record_problem(key: str) -> Callable[[Any], str | None]:
    def problem(row: Any) -> str | None:
        if not isinstance(row, dict) or not isinstance(row.get(key), str | int | float):
            return f"no {key!r} of a JSON object"
        return None

    return problem


def parse_lines(
    path: Path, problem: Callable[[Any], str | None] = row_problem
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Rows of a JSONL file and, for each line that holds none (``problem(row)`` says why),
    its number and the reason."""
    rows, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append((number, "cut short or not JSON"))
            continue
        reason = problem(row)
        if reason is None:
            rows.append(row)
        else:
            bad.append((number, reason[:100]))
    return rows, bad


def describe_lines(bad: list[tuple[int, str]]) -> str:
    """``[2, 5] (line 2: why; line 5: why)``"""
    return f"{[n for n, _ in bad]} ({'; '.join(f'line {n}: {why}' for n, why in bad)})"
