"""The N best checkpoints of a training run (``--checkpoint-hist N``), like timm's CheckpointSaver.

What "best" means in a pruning run: accuracy falls as sparsity rises, so ranking by the eval
metric alone would keep the dense epochs forever and never the pruned model the run is for.
Checkpoints are ranked by their scheduled sparsity first (sparser wins) and by the eval metric
within a sparsity level. For dense training this is timm's ranking; for gradual pruning the
history moves up with the schedule and ends holding the best epochs at the final sparsity (and,
when fewer than N epochs ran there, the best of the levels just below). The accuracy of every
epoch and level stays in ``summary.csv``; ``--checkpoint-freq`` keeps intermediate models.

Files (in the run folder): ``<model>_best_sparsity=S_epoch=E.pth`` for each kept checkpoint and
``<model>_best.pth``, a copy of the top one (timm's ``model_best.pth.tar``). Every checkpoint
holds the history (:meth:`CheckpointHistory.state_dict`), so a resumed run ranks its new epochs
against the whole run and forgets the files of an abandoned continuation.

Use: :meth:`offer` before writing the epoch's checkpoints (they then carry the new history),
write the file :meth:`offer` returned, then :meth:`commit` (drops the losers, updates the copy).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from sparseml.serialization import atomic_copy

_logger = logging.getLogger("sparse_training")


class CheckpointHistory:
    """Ranked best checkpoints of one run folder (rank 0 only)."""

    def __init__(self, out_dir: Path, prefix: str, max_history: int, decreasing: bool) -> None:
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.max_history, self.decreasing = max_history, decreasing
        self.entries: list[dict[str, Any]] = []  # best first
        self._dropped: list[dict[str, Any]] = []
        self._pattern = re.compile(re.escape(prefix) + r"_best_sparsity=[0-9.]+_epoch=\d+\.pth")

    @property
    def best_path(self) -> Path:
        return self.out_dir / f"{self.prefix}_best.pth"

    def _key(self, entry: dict[str, Any]) -> tuple[float, float]:
        metric = -entry["metric"] if self.decreasing else entry["metric"]
        return round(entry["sparsity"], 2), metric

    def offer(self, epoch: int, sparsity: float, metric: float) -> Path | None:
        """Rank this epoch; the path to write its checkpoint to, or None when it is not kept."""
        if self.max_history < 1 or not math.isfinite(metric):
            return None
        name = f"{self.prefix}_best_sparsity={sparsity:.2f}_epoch={epoch}.pth"
        entry = {"file": name, "epoch": int(epoch), "sparsity": float(sparsity)}
        entry["metric"] = float(metric)
        # A rerun of an epoch (resume) replaces its old entry; ties go to the earlier epoch.
        ranked = [e for e in self.entries if e["file"] != name] + [entry]
        ranked.sort(key=lambda e: (self._key(e), -e["epoch"]), reverse=True)
        kept, self._dropped = ranked[: self.max_history], ranked[self.max_history :]
        self.entries = kept
        return self.out_dir / name if entry in kept else None

    def commit(self) -> None:
        """After the checkpoints of the epoch are written: drop the losers, refresh the copy."""
        for entry in self._dropped:
            (self.out_dir / entry["file"]).unlink(missing_ok=True)
        self._dropped = []
        self._refresh_best()

    def _refresh_best(self) -> None:
        if not self.entries:  # a copy of no kept checkpoint would be a stale one
            self.best_path.unlink(missing_ok=True)
            return
        top = self.out_dir / self.entries[0]["file"]
        if self.best_path.is_file() and self.best_path.stat().st_mtime_ns == top.stat().st_mtime_ns:
            return  # already the copy of the top file
        atomic_copy(top, self.best_path)
        # The copy keeps the source's time: "newest checkpoint" stays the latest epoch's.
        stat = top.stat()
        os.utime(self.best_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    def load_state_dict(self, state: list[dict[str, Any]] | None) -> None:
        """Continue the history of a resumed run (absent in checkpoints of older versions).

        Entries whose files are gone are dropped; kept-checkpoint files the history does not
        list (from a continuation abandoned by resuming an earlier checkpoint) are removed.
        """
        entries = [dict(e) for e in state or [] if (self.out_dir / e["file"]).is_file()]
        entries.sort(key=lambda e: (self._key(e), -e["epoch"]), reverse=True)
        self.entries, self._dropped = entries[: self.max_history], entries[self.max_history :]
        listed = {e["file"] for e in self.entries}
        orphans = [
            p
            for p in self.out_dir.glob(f"{self.prefix}_best_*.pth")
            if self._pattern.fullmatch(p.name) and p.name not in listed
        ]
        for path in orphans:
            _logger.info("Removing %s: not among the best of the resumed run", path.name)
            path.unlink(missing_ok=True)
        self.commit()
