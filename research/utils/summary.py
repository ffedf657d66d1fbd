"""One CSV row per epoch (``summary.csv``), mirrored to W&B when it is on."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def summary_row(
    epoch: int,
    train_metrics: dict[str, float],
    eval_metrics: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """``epoch``, ``train/<k>``, ``eval/<k>``, then ``extra`` (lr, sparsity, sparsity counts)."""
    row: dict[str, Any] = {"epoch": epoch}
    row.update({f"train/{k}": v for k, v in train_metrics.items()})
    row.update({f"eval/{k}": v for k, v in eval_metrics.items()})
    row.update(extra)
    return row


def append_summary(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV at ``path``; the header is written when the file is new.

    A resumed run appends to the same file; a row whose columns differ from the header (for
    example after changing options) starts a fresh header line so no value lands in the wrong
    column.
    """
    path = Path(path)
    header: list[str] | None = None
    if path.is_file() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if header != list(row):
            writer.writeheader()
        writer.writerow(row)


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``summary.csv`` (all values as strings), for tests and plots."""
    with Path(path).open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("epoch") != "epoch"]
