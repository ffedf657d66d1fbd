"""Tables (CSV + Markdown) and plots of a benchmark results folder (``run_benchmarks.sh``).

Reads ``quality/<model>/seed*/results.jsonl``, ``quality/<model>/gradual.jsonl``, ``cost/cost.jsonl``,
``scaling/scaling.jsonl`` + ``fits.json`` and ``env.json`` under the folder; writes
``quality.csv``, ``gradual.csv``, ``cost.csv``, ``scaling.csv``, ``quality_<model>.png``,
``cost_phases.png``, ``scaling.png`` and ``summary.md`` (all tables, for the README) there.
Missing parts are left out, so it also reports a run that stopped early.

    python research/bench/report.py research/bench/results
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

import report_heldout as rh
from bench_common import guarded, records

from sparseml.serialization import atomic_write_text
from utils import results as res

GIB = 2**30
EXTRAPOLATE_M = 4096  # the paper's gradient count


def quality_rows(out: Path) -> list[dict[str, Any]]:
    """Per (model, method, sparsity): dense, mean, std, min, max over the seeds present."""
    rows = []
    for model_dir in sorted(p for p in (out / "quality").glob("*") if p.is_dir()):
        by_key: dict[tuple[str, float], list[float]] = {}
        dense: list[float] = []
        for seed_dir in sorted(model_dir.glob("seed*")):
            for (method, sparsity), row in res.latest_rows(res.read_rows(seed_dir)).items():
                if row.get("accuracy") is None:
                    continue
                if method == res.DENSE:
                    dense.append(row["accuracy"])
                else:
                    by_key.setdefault((method, sparsity), []).append(row["accuracy"])
        for (method, sparsity), accs in sorted(by_key.items()):
            rows.append({
                "model": model_dir.name, "method": method, "sparsity": sparsity,
                "seeds": len(accs), "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "min": min(accs), "max": max(accs),
                "dense": statistics.fmean(dense) if dense else None,
            })  # fmt: skip
    return rows


def cost_rows(out: Path) -> list[dict[str, Any]]:
    """One row per cost run. The Fisher build is OBS's curvature phase at the same (model, m)
    (CAP's curvature phase is the same build plus its elimination order, split off here).

    Extrapolation to m = 4096 is linear in m for drawing gradients and, on the Gram path
    (m >= B), for the Fisher build (its accumulation is O(m d B); the O(d B^2) inversion does
    not grow, so this is an upper bound); the pruning math does not depend on m.
    """
    rows = []
    all_rows = list(records(out / "cost" / "cost.jsonl").values())
    grad_224 = {r["model"]: r["grad_224_s"] for r in all_rows if r.get("grad_224_s")}
    fisher = {
        (r["model"], r["m"]): r["curvature_s"]
        for r in all_rows
        if r["method"] == "obs" and not r.get("skipped")
    }
    for r in all_rows:
        row = {k: r.get(k) for k in ("model", "method", "m", "B", "d", "img_size", "skipped")}
        if r.get("skipped"):
            rows.append(row)
            continue
        math_s = r["curvature_s"] + r["pruning_s"]
        target = r["fisher_bytes"] + r["model_bytes"] + r["chunk_bytes"]
        own = r.get("grad_224_s") or grad_224.get(r["model"])  # its own process's, if measured
        g224 = r["m"] * own if own else None
        row.update(
            gradients_s=r["gradients_s"], curvature_s=r["curvature_s"],
            pruning_s=r["pruning_s"], eval_s=r["eval_s"], math_s=math_s,
            math_over_gradients=math_s / r["gradients_s"] if r["gradients_s"] else None,
            gradients_224_s=g224, math_over_gradients_224=math_s / g224 if g224 else None,
            peak_gib=r["peak_rss"] / GIB, runtime_gib=r["runtime_rss"] / GIB,
            fisher_gib=r["fisher_bytes"] / GIB, target_gib=target / GIB,
            peak_over_target=(r["peak_rss"] - r["runtime_rss"]) / target,
            plan_gib=r["plan_bytes"] / GIB,
        )  # fmt: skip
        if r["method"] in ("obs", "cap"):
            row["fisher_s"] = fisher.get((r["model"], r["m"]))
        if r["method"] == "cap" and row.get("fisher_s") is not None:
            row["elimination_s"] = r["curvature_s"] - row["fisher_s"]
        scale = EXTRAPOLATE_M / r["m"]
        row[f"gradients_224_s_m{EXTRAPOLATE_M}"] = g224 * scale if g224 else None
        gram = r["m"] >= r["B"] and row.get("fisher_s") is not None
        row[f"fisher_s_m{EXTRAPOLATE_M}"] = row["fisher_s"] * scale if gram else None
        rows.append(row)
    return sorted(rows, key=lambda x: (x["model"], x["m"], x["method"]))


def scaling_rows(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = list(records(out / "scaling" / "scaling.jsonl").values())
    gemm = next((r for r in reversed(rows) if r.get("kind") == "gemm"), {})
    table = []
    for r in rows:
        if r.get("kind") != "point":
            continue
        row = {"d": r["d"], "B": r["B"], "m": r["m"], "fisher_s": r["fisher_s"]}
        row["fisher_gflops"] = r["fisher_gflop"] / r["fisher_s"]
        row["fisher_of_fp64_gemm"] = (
            row["fisher_gflops"] / gemm["gemm_fp64_gflops"] if gemm else None
        )
        if "cap_s" in r:
            row["cap_s"] = r["cap_s"]
            row["cap_gflops"] = r["cap_gflop"] / r["cap_s"]
            row["cap_of_fp64_gemm"] = row["cap_gflops"] / gemm["gemm_fp64_gflops"] if gemm else None
        table.append(row)
    fits_path = out / "scaling" / "fits.json"
    fits = json.loads(fits_path.read_text()) if fits_path.is_file() else {}
    return table, {**fits, "gemm": gemm}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


ORDER = (
    "gm",
    "obs",
    "mfac",
    "fast_cap_ref",
    "fast_cap",
    "cap",
)  # the table's column order; others after


def method_order(methods: list[str]) -> list[str]:
    def key(m: str) -> tuple:
        base = m.removesuffix("+bn")
        return (ORDER.index(base) if base in ORDER else len(ORDER), base, m)

    return sorted(methods, key=key)


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    spread = f" ± {fmt(row['std'])}" if row["seeds"] > 1 else ""
    return f"{fmt(row['mean'])}{spread}"


def quality_md(rows: list[dict[str, Any]]) -> list[str]:
    """Per model: unstructured sparsities x methods, then the 2:4 results in one row."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        dense = next((r["dense"] for r in mine if r["dense"] is not None), None)
        seeds = max(r["seeds"] for r in mine)
        plain = method_order(list({r["method"] for r in mine
                                   if not r["method"].endswith("_2to4") and "+bn" not in r["method"]}))  # fmt: skip
        bn = method_order(list({r["method"] for r in mine if r["method"].endswith("+bn")}))
        cells = {(r["method"], r["sparsity"]): r for r in mine}
        spread = (f"mean ± std over {seeds} seeds of the gradient sample (gm: one run, it "
                  "draws none)" if seeds > 1 else "one seed of the gradient sample")  # fmt: skip
        lines += [f"**{model}**: dense {fmt(dense)}% top-1. One-shot top-1 (%), {spread}.", "",
                  "| sparsity | " + " | ".join(plain) + " |", "|---:|" + "---:|" * len(plain)]  # fmt: skip
        for s in sorted({r["sparsity"] for r in mine if r["method"] in plain}):
            lines.append(f"| {s:g} | " + " | ".join(cell(cells.get((m, s))) for m in plain) + " |")
        if bn:
            lines += ["", "With BatchNorm recalibrated after pruning (`+bn`):", "",
                      "| sparsity | " + " | ".join(bn) + " |", "|---:|" + "---:|" * len(bn)]  # fmt: skip
            for s in sorted({r["sparsity"] for r in mine if r["method"] in bn}):
                lines.append(f"| {s:g} | " + " | ".join(cell(cells.get((m, s))) for m in bn) + " |")
        nm = method_order([m.removesuffix("_2to4") for m in {r["method"] for r in mine}
                           if m.endswith("_2to4")])  # fmt: skip
        if nm:
            lines += ["", "| 2:4 (50%) | " + " | ".join(nm) + " |", "|---|" + "---:|" * len(nm)]
            lines.append(
                "| top-1 | " + " | ".join(cell(cells.get((f"{m}_2to4", 0.5))) for m in nm) + " |"
            )
        lines.append("")
    return lines


def cost_md(rows: list[dict[str, Any]]) -> list[str]:
    m4k = EXTRAPOLATE_M
    head = ("| model | method | m | d | gradients s | curvature s (Fisher) | pruning s | eval s "
            "| math / gradients (at 224) | peak GiB | Fisher blocks GiB | (peak - runtime) / "
            f"target | m={m4k}: gradients at 224 s, Fisher s |")  # fmt: skip
    lines = [head, "|---|---|---:|---:|" + "---:|" * 9]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {r['method']} | {r['m']} | {r['d']} | skipped: "
                         f"{r['skipped']} |" + " |" * 8)  # fmt: skip
            continue
        fisher = f" ({fmt(r['fisher_s'], 1)})" if r.get("fisher_s") is not None else ""
        ratio = f"{fmt(r['math_over_gradients'])} ({fmt(r['math_over_gradients_224'])})"
        extra = f"{fmt(r[f'gradients_224_s_m{m4k}'], 0)}, {fmt(r[f'fisher_s_m{m4k}'], 0)}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['m']} | {r['d']} | {fmt(r['gradients_s'], 1)} "
            f"| {fmt(r['curvature_s'], 1)}{fisher} | {fmt(r['pruning_s'], 1)} "
            f"| {fmt(r['eval_s'], 1)} | {ratio} | {fmt(r['peak_gib'])} | {fmt(r['fisher_gib'])} "
            f"| {fmt(r['peak_over_target'])} | {extra} |"
        )
    return lines + [""]


def scaling_md(rows: list[dict[str, Any]], fits: dict[str, Any]) -> list[str]:
    gemm = fits.get("gemm") or {}
    lines = [
        f"GEMM reference (torch.mm, n={gemm.get('n')}): float32 "
        f"{fmt(gemm.get('gemm_fp32_gflops'), 1)} GFLOP/s, float64 "
        f"{fmt(gemm.get('gemm_fp64_gflops'), 1)} GFLOP/s.",
        "",
        "| d | B | m | Fisher s | Fisher GFLOP/s | of fp64 GEMM | CAP s | CAP GFLOP/s "
        "| of fp64 GEMM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['B']} | {r['m']} | {fmt(r['fisher_s'])} | {fmt(r['fisher_gflops'], 1)} "
            f"| {fmt(r['fisher_of_fp64_gemm'])} | {fmt(r.get('cap_s'))} "
            f"| {fmt(r.get('cap_gflops'), 1)} | {fmt(r.get('cap_of_fp64_gemm'))} |"
        )
    exps = fits.get("exponents") or {}
    if exps:
        lines += ["", "Fitted exponents (t ~ x^k): " + ", ".join(
            f"{k.replace('_', ' in ')} {v:.2f}" for k, v in exps.items())]  # fmt: skip
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", help="results folder of run_benchmarks.sh")
    out = Path(p.parse_args(argv).out)
    quality = quality_rows(out)
    gradual = [
        row
        for path in sorted((out / "quality").glob("*/gradual.jsonl"))
        for row in sorted(records(path).values(), key=lambda r: r["key"])
    ]
    cost = cost_rows(out)
    scaling, fits = scaling_rows(out)
    heldout, timing = rh.heldout_rows(out), rh.timing_rows(out)
    for name, rows in (
        ("quality", quality),
        ("heldout", heldout),
        ("prune_time", timing),
        ("gradual", gradual),
        ("cost", cost),
        ("scaling", scaling),
    ):
        write_csv(out / f"{name}.csv", rows)
    import plots_bench

    plots_bench.draw_all(out, quality, cost, scaling)
    env_path = out / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    lines = [f"Environment: torch {env.get('torch')}, {env.get('threads')} threads, "
             f"{env.get('cpu_model')} ({env.get('cpu_count')} CPUs)", ""]  # fmt: skip
    if heldout:
        lines += ["### Settings chosen on held-out training images", "", *rh.heldout_md(heldout)]
    if quality:
        lines += ["### One-shot quality on Fashion-MNIST", "", *quality_md(quality)]
    if timing:
        lines += rh.timing_md(timing)
    if gradual:
        lines += ["### Gradual pruning to 90% with fine-tuning", "",
                  "| model | method | epochs | top-1 | target sparsity (recipe's layers) "
                  "| measured, all Linear/Conv weights |",
                  "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['model']} | {r['method']} | {r['epochs']} | {fmt(r['accuracy'])} "
                  f"| {fmt(r.get('sparsity'), 3)} | {fmt(r.get('prunable_sparsity'), 3)} |"
                  for r in gradual]  # fmt: skip
        lines.append("")
    if cost:
        lines += ["### Cost at real layer sizes", "", *cost_md(cost)]
    if scaling:
        lines += ["### Kernel scaling", "", *scaling_md(scaling, fits)]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", text)
    print(text)


if __name__ == "__main__":
    guarded(main)
