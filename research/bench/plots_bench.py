"""The benchmark report's plots (PNG, written atomically through ``utils.plots``' writer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.plots import _pyplot, _save  # one atomic PNG writer for every plot of the project

PHASES = ("gradients_s", "curvature_s", "pruning_s", "eval_s")


def quality(out: Path, model: str, rows: list[dict[str, Any]]) -> Path:
    """Top-1 against sparsity per method: the mean over seeds, the band from min to max."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense = next((r["dense"] for r in rows if r["dense"] is not None), None)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted(
            (r["sparsity"], r["mean"], r["min"], r["max"]) for r in rows if r["method"] == method
        )
        xs, mean, lo, hi = zip(*pts)
        style = "*" if "2to4" in method else "o-"
        (line,) = ax.plot(xs, mean, style, label=method, markersize=8 if "2to4" in method else 4)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", label=f"dense {dense:.1f}%")
    ax.set(xlabel="sparsity", ylabel="top-1 (%)", title=f"{model} on Fashion-MNIST, one-shot")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / f"quality_{model}.png")


def cost(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Stacked wall time per phase of every (model, method, m) run."""
    rows = [r for r in rows if not r.get("skipped")]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows)), 4.5))
    labels = [f"{r['model']}\n{r['method']} m={r['m']}" for r in rows]
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        values = [r[phase] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=phase.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(ylabel="seconds", title="One-shot pruning: wall time per phase")
    ax.tick_params(axis="x", labelsize=7, rotation=90)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "cost_phases.png")


def scaling(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Time against d, B and m on log-log axes (the other two at their middle value)."""
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, axis in zip(axes, ("d", "B", "m")):
        others = [k for k in ("d", "B", "m") if k != axis]
        mids = {k: sorted({r[k] for r in rows})[len({r[k] for r in rows}) // 2] for k in others}
        pts = sorted((r[axis], r) for r in rows if all(r[k] == mids[k] for k in others))
        for kernel in ("fisher_s", "cap_s"):
            got = [(x, r[kernel]) for x, r in pts if kernel in r]
            if got:
                ax.loglog(*zip(*got), "o-", label=kernel.removesuffix("_s"))
        ax.set(
            xlabel=axis,
            ylabel="seconds",
            title=f"vs {axis} ({', '.join(f'{k}={v}' for k, v in mids.items())})",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "scaling.png")


def draw_all(out: Path, quality_rows: list, cost_rows: list, scaling_rows: list) -> None:
    for model in dict.fromkeys(r["model"] for r in quality_rows):
        quality(out, model, [r for r in quality_rows if r["model"] == model])
    cost(out, cost_rows)
    scaling(out, scaling_rows)
