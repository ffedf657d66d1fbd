"""The quality report's extra tables: the held-out settings sweep (``chosen.json`` of
``bench_heldout``), BatchNorm-recalibrated rows and the pruning time per method."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import bench_common  # noqa: F401  (puts research/ on sys.path)

from utils import results as res


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def heldout_rows(out: Path) -> list[dict[str, Any]]:
    """One row per candidate of every swept method: its held-out top-1 and whether it won."""
    rows = []
    for path in sorted((out / "quality").glob("*/chosen.json")):
        record = json.loads(path.read_text())
        for method, entry in record["methods"].items():
            for c in entry["candidates"]:
                rows.append({
                    "model": path.parent.name, "method": method,
                    "settings": ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in c["variables"].items()),
                    "sparsities": " ".join(f"{s:g}" for s in record["sparsities"]),
                    "heldout": " / ".join(_fmt(a) for a in c["accuracy"]), "mean": c["mean"],
                    "chosen": c["variables"] == entry["variables"], "holdout": record["holdout"],
                })  # fmt: skip
    return rows


def heldout_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        lines += [f"**{model}**: top-1 (%) on the {mine[0]['holdout']} held-out training "
                  f"images at {mine[0]['sparsities']} (first seed); the best mean is chosen (**bold**).",
                  "", "| method | settings | held-out top-1 | mean |", "|---|---|---:|---:|"]  # fmt: skip
        for r in mine:
            mean = f"**{_fmt(r['mean'])}**" if r["chosen"] else _fmt(r["mean"])
            lines.append(f"| {r['method']} | {r['settings']} | {r['heldout']} | {mean} |")
        lines.append("")
    return lines


def timing_rows(out: Path) -> list[dict[str, Any]]:
    """Per (model, method): the curvature + pruning seconds of a seed's first prune (the one
    that builds what the sweep reuses; gradients excluded), mean over the seeds."""
    rows = []
    for model_dir in sorted(p for p in (out / "quality").glob("*") if p.is_dir()):
        per: dict[str, list[float]] = {}
        for seed_dir in sorted(model_dir.glob("seed*")):
            first: dict[str, float] = {}
            for row in res.read_rows(seed_dir):
                phases = row.get("phase_seconds") or {}
                if row["method"] == res.DENSE or not phases or "+bn" in row["method"]:
                    continue
                spent = phases.get("curvature", 0.0) + phases.get("pruning", 0.0)
                first[row["method"]] = max(first.get(row["method"], 0.0), spent)
            for method, spent in first.items():
                per.setdefault(method, []).append(spent)
        for method, values in sorted(per.items()):
            rows.append({"model": model_dir.name, "method": method,
                         "prune_s": statistics.fmean(values), "seeds": len(values)})  # fmt: skip
    return rows


def timing_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Pruning time: curvature + pruning phases of a seed's first prune (what the "
             "sparsity sweep then reuses; drawing the gradients excluded), mean over seeds, "
             "seconds on one thread.", "", "| model | method | seconds |", "|---|---|---:|"]  # fmt: skip
    lines += [f"| {r['model']} | {r['method']} | {_fmt(r['prune_s'])} |" for r in rows]
    return lines + [""]
