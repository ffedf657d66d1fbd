"""Plots of the research scripts, written atomically as PNG.

* :func:`plot_accuracy` (one-shot sweeps): top-1 accuracy against sparsity per method, and
  beside it the accuracy drop from the dense model, whose y-range stops :data:`DROP_FLOOR`
  points below it so that methods close to dense stay apart when another collapses. N:M
  results (a fixed sparsity N/M, usually one point) get their own markers.
* :func:`plot_training` (gradual runs): top-1 accuracy and scheduled sparsity per epoch, from
  ``summary.csv``.
* :func:`plot_layer_sparsity` (``inspect_sparsity.py``): sparsity per layer as bars.

Titles name the model and the data set. matplotlib is imported inside the functions: the
scripts need it only when they draw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sparseml.serialization import atomic_open

from .results import DENSE, _accuracy, _methods, latest_rows, row_key

PLOT_TRAINING = "training_curves.png"
DROP_FLOOR = -10.0  # accuracy points below dense where the drop panel stops
_NM_MARKERS = ("*", "P", "X", "D", "^", "v")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
    finally:
        _pyplot().close(fig)
    return path


def dataset_label(args: Any) -> str:
    """The data set for titles: ``--dataset``, else the ImageFolder root's name."""
    if args.dataset:
        return str(args.dataset)
    root = getattr(args, "data_dir", None) or ""
    return f"ImageFolder {Path(root).name}" if root else "ImageFolder data"


def _names(values: Iterable[Any], fallback: str) -> str:
    found = list(dict.fromkeys(str(v) for v in values if v))
    return ", ".join(found) if found else fallback


def _mask_type(row: dict[str, Any]) -> str:
    """ "unstructured" or an N:M pattern such as "2:4" (from the row's modifier settings)."""
    mask = (row.get("settings") or {}).get("mask_type") or "unstructured"
    return str(mask)


def plot_accuracy(
    rows: Iterable[dict[str, Any]],
    path: str | Path,
    model: str | None = None,
    dataset: str | None = None,
) -> Path:
    """Accuracy vs sparsity and accuracy drop vs sparsity, one series per method.

    ``model`` and ``dataset`` name the title (default: read from the rows).
    """
    plt = _pyplot()
    latest = latest_rows(rows)
    all_rows = list(latest.values())
    model = model or _names((r.get("model") for r in all_rows), "model")
    dataset = dataset or _names(
        ((r.get("settings") or {}).get("dataset") for r in all_rows), "ImageFolder data"
    )
    dense_row = latest.get(row_key(DENSE, 0.0))
    dense = _accuracy(dense_row)
    fig, (ax, drop_ax) = plt.subplots(1, 2, figsize=(11.5, 4.6))
    drops: list[float] = []
    collapsed: list[str] = []
    nm_index = 0
    for method in _methods(latest):
        points = sorted(
            (s, _accuracy(r), _mask_type(r)) for (m, s), r in latest.items() if m == method
        )
        masks = sorted({p[2] for p in points})
        structured = [m for m in masks if m != "unstructured"]
        style: dict[str, Any] = {"marker": "o", "label": method}
        if structured:  # fixed-sparsity patterns: a marker of their own, no line through them
            style = {
                "marker": _NM_MARKERS[nm_index % len(_NM_MARKERS)],
                "markersize": 11,
                "linestyle": "none" if len(points) == 1 else "--",
                "label": f"{method} ({', '.join(structured)})",
            }
            nm_index += 1
        xs = [p[0] for p in points]
        (line,) = ax.plot(xs, [p[1] for p in points], **style)
        if math.isfinite(dense):
            diff = [p[1] - dense for p in points]
            drop_ax.plot(xs, diff, color=line.get_color(), **style)
            drops += [d for d in diff if math.isfinite(d)]
            if any(d < DROP_FLOOR for d in diff):
                collapsed.append(method)
    if math.isfinite(dense):
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense {dense:.2f}%")
        drop_ax.axhline(0.0, color="black", linestyle="--", linewidth=1)
        low = max(min(drops, default=-1.0), DROP_FLOOR)
        high = max(max(drops, default=0.0), 0.0)
        margin = max(0.05 * (high - low), 0.2)
        drop_ax.set_ylim(low - margin, high + margin)
    else:
        drop_ax.text(0.5, 0.5, "no dense result", ha="center", transform=drop_ax.transAxes)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("accuracy")
    drop_ax.set_ylabel("top-1 minus dense (points)")
    cut = f"\n(cut at {DROP_FLOOR:g} points; below: {', '.join(collapsed)})" if collapsed else ""
    drop_ax.set_title("accuracy drop from dense" + cut, **({"fontsize": 10} if cut else {}))
    for axis in (ax, drop_ax):
        axis.set_xlabel("sparsity")
        axis.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"One-shot pruning of {model} on {dataset}")
    fig.tight_layout()
    return _save(fig, path)


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    out = []
    for row in rows:
        try:
            out.append(float(row.get(key, "")))
        except ValueError:
            out.append(math.nan)
    return out


def plot_training(
    rows: list[dict[str, Any]],
    path: str | Path,
    model: str,
    dataset: str,
    metric: str = "top1",
    pruning: bool = True,
) -> Path:
    """Top-1 accuracy (left axis) and scheduled sparsity (right axis) against the epoch.

    ``rows`` are ``summary.csv`` rows (:func:`utils.summary.read_summary` or the rows written).
    ``pruning``: whether the run prunes (its recipe has a pruning modifier); a dense run's plot
    is titled as dense training.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    name = {"top1": "top-1", "top5": "top-5"}.get(metric, metric)
    ax.plot(epochs, _floats(rows, f"eval_{metric}"), marker="o", color="tab:blue", label=name)
    if metric == "top1" and any("eval_top5" in r for r in rows):
        ax.plot(epochs, _floats(rows, "eval_top5"), color="tab:blue", alpha=0.35, label="top-5")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"eval {name} (%)" if metric.startswith("top") else f"eval {name}")
    ax.grid(True, alpha=0.3)
    right = ax.twinx()
    sparsity = _floats(rows, "sparsity")
    right.plot(epochs, sparsity, marker="s", markersize=3, color="tab:red", label="sparsity")
    prunable = _floats(rows, "prunable_sparsity_percent")
    if any(math.isfinite(v) for v in prunable):
        measured = [v / 100 for v in prunable]
        right.plot(epochs, measured, ":", color="tab:red", label="measured (prunable layers)")
    right.set_ylabel("sparsity", color="tab:red")
    right.set_ylim(-0.02, 1.02)
    handles, labels = (a + b for a, b in zip(*(x.get_legend_handles_labels() for x in (ax, right))))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    kind = "Gradual pruning" if pruning else "Dense training"
    ax.set_title(f"{kind} of {model} on {dataset}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


def plot_layer_sparsity(report: dict[str, Any], path: str | Path, title: str) -> Path:
    """One horizontal bar per layer (``sparsity_table.sparsity_report``), coloured by the
    N:M pattern it satisfies, with the weighted mean over the layers as a dashed line."""
    plt = _pyplot()
    rows = report["layers"]
    fig, ax = plt.subplots(figsize=(8.0, max(2.5, 0.28 * len(rows) + 1.5)))
    patterns = sorted({r["nm"] or "unstructured" for r in rows})
    colors = {p: f"C{i}" for i, p in enumerate(patterns)}
    ys = list(range(len(rows)))[::-1]  # first layer on top
    for pattern in patterns:
        picked = [(y, r) for y, r in zip(ys, rows) if (r["nm"] or "unstructured") == pattern]
        ax.barh([y for y, _ in picked], [100 * r["sparsity"] for _, r in picked],
                color=colors[pattern], label=pattern)  # fmt: skip
    mean = 100 * report["totals"]["layer_sparsity"]
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"all layers {mean:.1f}%")
    ax.set_yticks(ys, [r["name"] for r in rows], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
