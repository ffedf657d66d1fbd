"""Result rows of a one-shot sparsity sweep: crash-safe files and a table (plots: ``utils.plots``).

``results.jsonl`` (one JSON object a line) is the source of truth: every row is appended to it
as soon as it is computed, flushed and fsync'ed, so a killed sweep loses at most the row in
progress. ``results.csv``, the table and the plot are regenerated from it (the CSV atomically,
after every row and when a sweep starts), so a kill between two writes cannot make them
disagree for good. A line cut short by a kill is dropped with a warning when the next sweep
starts (:func:`repair`), and its row is computed again; so is a line that holds no valid row
(``jsonl_rows.row_problem``: a field the code reads is missing or of the wrong type, e.g. edited by
hand). Rows are keyed by
``(method, sparsity)``; when a key appears twice the last row wins. The dense model is stored as
a row with method ``dense`` and sparsity 0.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sparseml.serialization import atomic_write_text, write_error

from .errors import SetupError
from .jsonl_rows import describe_lines, parse_lines, record_problem

_logger = logging.getLogger("one_shot")

JSONL = "results.jsonl"
CSV = "results.csv"
PLOT = "accuracy_vs_sparsity.png"  # drawn by utils.plots.plot_accuracy
DENSE = "dense"
# CSV columns; nested values (per-layer sparsity) are written as JSON text.
COLUMNS = [
    "method",
    "modifier",
    "sparsity",
    "accuracy",
    "top5",
    "loss",
    "samples",
    "measured_sparsity",
    "prunable_sparsity",
    "seconds",
    "eval_seconds",
    "peak_mem_mb",
    "mem_kind",
    "model",
    "recipe",
    "device",
    "world_size",
    "settings",
    "time",
    "layer_sparsity",
]


def row_key(method: str, sparsity: float) -> tuple[str, float]:
    return method, round(float(sparsity), 6)


def read_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of ``results.jsonl`` in file order; lines holding no valid row are skipped."""
    path = Path(out_dir) / JSONL
    if not path.is_file():
        return []
    rows, bad = parse_lines(path)
    if bad:
        _logger.warning("%s: lines %s hold no valid row; ignored", path, describe_lines(bad))
    return rows


def repair(out_dir: str | Path) -> list[dict[str, Any]]:
    """Drop lines holding no valid row from ``results.jsonl`` and regenerate ``results.csv``;
    the rows.

    Call it when a sweep starts (holding the folder's lock): a kill during an append leaves a
    cut line, whose row is then missing and computed again (so is a row edited into a wrong
    type).
    """
    out = Path(out_dir)
    path = out / JSONL
    if not path.is_file():
        return []
    rows, bad = parse_lines(path)
    if bad:
        _logger.warning(
            "%s: dropped lines %s holding no valid row (interrupted write or edit); their "
            "rows are computed again",
            path,
            describe_lines(bad),
        )
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    write_csv(out, rows)
    return rows


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """``{(method, sparsity): row}`` keeping the last row of each key."""
    return {row_key(r["method"], r["sparsity"]): r for r in rows}


def _csv_line(row: dict[str, Any]) -> str:
    buf = io.StringIO()
    values = {
        k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v
        for k, v in row.items()
        if k in COLUMNS
    }
    csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _csv_header() -> str:
    return ",".join(COLUMNS) + "\n"


def _append_durably(path: Path, text: str) -> None:
    """Append ``text`` (whole lines) and fsync; on failure cut the file back to where it was."""
    size = path.stat().st_size if path.is_file() else 0
    try:
        with path.open("a+b") as f:
            if size:
                # A line cut by an earlier crash must not swallow this row.
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        wrapped = write_error(path, err)
        # If even this fails, repair() drops the cut line when the sweep runs again.
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise wrapped from err


def write_csv(out_dir: str | Path, rows: list[dict[str, Any]] | None = None) -> None:
    """Regenerate ``results.csv`` from ``rows`` (default: those of ``results.jsonl``)."""
    out = Path(out_dir)
    rows = read_rows(out) if rows is None else rows
    atomic_write_text(out / CSV, _csv_header() + "".join(_csv_line(r) for r in rows))


def append_row(out_dir: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``results.jsonl`` (flush + fsync), then regenerate ``results.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _append_durably(out / JSONL, json.dumps(row, sort_keys=False, allow_nan=False) + "\n")
    write_csv(out)


def append_record(path: str | Path, row: dict[str, Any]) -> None:
    """Append any JSON object as one line of ``path`` (flush + fsync; the benchmarks' records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _append_durably(path, json.dumps(row, allow_nan=False) + "\n")


def read_records(path: str | Path, key: str = "key") -> dict[Any, dict[str, Any]]:
    """``{row[key]: row}`` of a JSONL file written by :func:`append_record` (the last row of a
    key wins); lines cut short by a kill (or without a ``key``) are skipped with a warning, so
    their rows are computed again by a rerun."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows, bad = parse_lines(path, record_problem(key))
    if bad:
        _logger.warning("%s: lines %s hold no valid record; ignored", path, describe_lines(bad))
    return {row[key]: row for row in rows}


def rewrite_rows(out_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``results.jsonl`` by ``rows`` (atomically) and regenerate the CSV from it."""
    out = Path(out_dir)
    atomic_write_text(out / JSONL, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    write_csv(out, rows)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples as lists, keys as strings: as read back


def plan_resume(
    out_dir: str | Path,
    method: str,
    sparsities: list[float],
    settings: dict[str, dict[str, Any]],
    overwrite: bool = False,
    files: Callable[[float, bool], list[Path]] | None = None,
) -> dict[str, Any]:
    """What is left to compute: ``{"dense": bool, "sparsities": [...]}``: the sparsities
    without a row, or with a row but without one of the ``files(sparsity, False)`` the run asks
    for (``--save-model``, ``--save-compressed``: asked for now, or deleted since).
    ``files(sparsity, True)``, every kind, go with the rows ``overwrite`` drops.

    ``settings`` holds the settings of the dense row (key ``dense``) and of ``method``. A row is
    stale when it was made with other settings of its own method, or (any method) from another
    dense model/data. Stale rows raise :class:`SetupError` unless ``overwrite``, which removes
    them from both files so they are computed again.
    """
    out = Path(out_dir)
    rows = repair(out)
    want = {k: _plain(v) for k, v in settings.items()}

    def differing(row: dict[str, Any]) -> list[str]:
        old = row.get("settings") or {}
        ours = row["method"] in want
        expected = want[row["method"]] if ours else want[DENSE]
        keys = set(expected) | (set(old) if ours else set())
        return sorted(k for k in keys if old.get(k) != expected.get(k))

    stale = {r["method"]: diff for r in rows if (diff := differing(r))}
    if stale and not overwrite:
        name, diff = sorted(stale.items())[0]
        raise SetupError(
            f"{out / JSONL} has rows for method {name!r} made with other settings "
            f"(differing: {', '.join(diff)}); use another --output_dir or --method, or "
            "--overwrite to recompute them"
        )
    if stale:
        for row in rows:  # their saved models go too: a later rerun would take them as done
            if row["method"] == method and method in stale and files:
                for path in files(row["sparsity"], True):
                    path.unlink(missing_ok=True)
        rows = [r for r in rows if r["method"] not in stale]
        rewrite_rows(out, rows)
        _logger.info("Dropped earlier rows of %s (--overwrite)", ", ".join(sorted(stale)))
    done = latest_rows(rows)
    todo = [s for s in sparsities if row_key(method, s) not in done]
    lacking = [s for s in sparsities if s not in todo and files and not all(
        p.is_file() for p in files(s, False))]  # fmt: skip
    if len(todo) + len(lacking) < len(sparsities):
        _logger.info(
            "%d of %d sparsities already in %s: skipped",
            len(sparsities) - len(todo) - len(lacking),
            len(sparsities),
            out,
        )
    if lacking:
        _logger.info(
            "Sparsities %s have rows but not the files asked for: computed again",
            ", ".join(f"{s:g}" for s in lacking),
        )
        todo = [s for s in sparsities if s in todo or s in lacking]
    return {"dense": row_key(DENSE, 0.0) not in done, "sparsities": todo}


def _methods(rows: dict[tuple[str, float], dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for method, _ in rows:
        if method != DENSE and method not in seen:
            seen.append(method)
    return seen


def _accuracy(row: dict[str, Any] | None) -> float:
    """The row's top-1 accuracy, NaN when the row is missing or stores null (a non-finite
    result, written as null so that strict JSON readers accept the file)."""
    value = None if row is None else row.get("accuracy")
    return float("nan") if value is None else float(value)


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """Top-1 accuracy (%) with sparsities as rows and methods as columns, dense on top."""
    latest = latest_rows(rows)
    methods = _methods(latest)
    sparsities = sorted({s for m, s in latest if m != DENSE})
    width = max([8, *(len(m) for m in methods)])
    lines = ["sparsity  " + "  ".join(f"{m:>{width}}" for m in methods)]
    dense = latest.get(row_key(DENSE, 0.0))
    if dense is not None:
        lines.insert(0, f"dense top-1 accuracy: {_accuracy(dense):.2f}%")
    for s in sparsities:
        cells = []
        for m in methods:
            row = latest.get((m, s))
            cells.append(f"{_accuracy(row):>{width}.2f}" if row else f"{'-':>{width}}")
        lines.append(f"{s:<8.3f}  " + "  ".join(cells))
    return "\n".join(lines)


def wandb_start(project: str, name: str, config: dict[str, Any], out_dir: Path) -> Any:
    """Start a W&B run (online with credentials, as timm; see compat.set_wandb_mode)."""
    try:
        import wandb
    except ImportError as err:
        raise SetupError("--log_wandb needs the wandb package: pip install wandb") from err
    wandb.init(project=project, name=name, config=config, dir=str(out_dir))
    return wandb


def wandb_final(wandb: Any, rows: list[dict[str, Any]], plot: Path) -> None:
    """Log the results table and the plot, and close the run."""
    columns = ["method", "sparsity", "accuracy", "top5", "loss", "measured_sparsity", "seconds"]
    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    wandb.log({"results": table, "accuracy_vs_sparsity": wandb.Image(str(plot))})
    wandb.finish()
