"""One CSV row per epoch (``summary.csv``), mirrored to W&B when it is on.

The file is keyed by epoch: writing the row of epoch ``e`` rewrites the whole file (atomically)
with the earlier epochs and this one, so a resumed run never duplicates an epoch, and rows of
later epochs, left by an abandoned continuation (a resume from an older checkpoint), go away
with it. Columns are the union of all rows in order of first appearance.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from sparseml.serialization import atomic_write_text

_logger = logging.getLogger("sparse_training")


def summary_row(
    epoch: int,
    train_metrics: dict[str, float],
    eval_metrics: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """timm's ``update_summary`` layout: ``epoch``, ``train_<k>``, ``eval_<k>``, then ``extra``
    (lr, sparsity, sparsity counts)."""
    row: dict[str, Any] = {"epoch": epoch}
    row.update({f"train_{k}": v for k, v in train_metrics.items()})
    row.update({f"eval_{k}": v for k, v in eval_metrics.items()})
    row.update(extra)
    return row


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``summary.csv`` (all values as strings).

    Files of older versions may hold a new header line where the columns changed, and a line
    cut short by a kill: each row is read with the header above it; short lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    with path.open(newline="") as f:
        for number, cells in enumerate(csv.reader(f), 1):
            if not cells:
                continue
            if cells[0] == "epoch":
                header = cells
            elif header is None or len(cells) != len(header) or not cells[0].isdigit():
                _logger.warning("%s line %d is incomplete or has no header; ignored", path, number)
            else:
                rows.append(dict(zip(header, cells, strict=True)))
    return rows


def write_summary_row(path: str | Path, row: dict[str, Any]) -> None:
    """Store ``row`` as the last line of ``path``: rows of ``row["epoch"]`` and later go."""
    epoch = int(row["epoch"])
    rows: list[dict[str, Any]] = [r for r in read_summary(path) if int(r["epoch"]) < epoch]
    rows.append(row)
    columns = list(dict.fromkeys(key for r in rows for key in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
