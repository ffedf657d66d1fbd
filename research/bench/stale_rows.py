"""Which one-shot rows of the quality benchmark a rerun recomputes.

``<out>/<model>/sweep.json`` records the settings the seed folders' rows were made with: the
gradient sample, the BatchNorm batches and each method's held-out choice. When the gradient
settings change, every row is stale; when a method's choice changes, that method's rows and
those of the jobs derived from it are; the rest are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sparseml.serialization import atomic_write_text
from utils import results as res

# CAP runs with its chosen loss ranking and with the other one (``cap_<other>``).
OTHER_RANKING = {"cumulative": "per_step", "per_step": "cumulative"}


def stale_methods(old: object, want: dict) -> set[str] | None:
    """Methods of ``want`` whose earlier rows no longer count when the sweeps' settings go
    from ``old`` to ``want``: those whose held-out choice changed (methods not in ``want``
    are not run now and keep theirs); None (all of them) when anything else changed (the
    gradient sample, BatchNorm batches) or ``old`` is unreadable."""
    if not isinstance(old, dict) or not isinstance(old.get("chosen"), dict):
        return None
    if {k: v for k, v in old.items() if k != "chosen"} != {
        k: v for k, v in want.items() if k != "chosen"
    }:
        return None
    before, after = old["chosen"], want["chosen"]
    return {m for m in after if before.get(m) != after[m]}


def drop_rows(folder: Path, methods: set[str]) -> None:
    """Remove from a seed folder's results the rows of ``methods`` and of the jobs derived
    from them (the other loss ranking, ``+bn``, 2:4)."""
    derived = {f"{m}{tail}" for m in methods for tail in ("", "+bn", "_2to4")}
    derived |= {f"{m}_{ranking}" for m in methods for ranking in OTHER_RANKING}
    rows = res.read_rows(folder)
    kept = [r for r in rows if r.get("method") not in derived]
    if len(kept) != len(rows):
        res.rewrite_rows(folder, kept)


def refresh(model_dir: Path, want: dict) -> None:
    """Remove the seed folders' stale rows (`stale_methods`), then record ``want`` in
    ``sweep.json`` (with the recorded choices of the methods not run now). A kill between the
    two finds the same stale rows again."""
    meta = model_dir / "sweep.json"
    try:
        old = json.loads(meta.read_text()) if meta.is_file() else want
    except (OSError, ValueError):
        old = None
    stale = stale_methods(old, want)
    name = model_dir.name
    if stale is None:
        print(f"== {name}: gradient settings changed; removing the earlier sweeps", flush=True)
        for folder in model_dir.glob("seed*"):
            shutil.rmtree(folder)
    else:
        if stale:
            print(
                f"== {name}: settings of {sorted(stale)} changed; removing their rows", flush=True
            )
            for folder in model_dir.glob("seed*"):
                drop_rows(folder, stale)
        want = {**want, "chosen": {**old["chosen"], **want["chosen"]}}
    atomic_write_text(meta, json.dumps(want))
