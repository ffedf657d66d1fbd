"""The quality benchmark's settings step: each method's damp (and CAP's block size and loss
ranking) chosen on held-out training images, as a user would, never on the test set.

The last ``--holdout`` images of the training split are kept out of the dense training and of
every gradient sample; ``<out>/quality/data_holdout`` holds the training images the others use
and, as its test split, the held-out ones. Every candidate of :data:`GRID` (CAP's published
settings among them: damp 1e-8, B = 192 for ViTs, 256 for ResNets) prunes the dense model with
the first seed at ``--sweep-sparsities`` and is evaluated on the held-out images (rows in
``<out>/<model>/heldout/results.jsonl``); the candidate with the best mean held-out top-1 wins
(ties: the earlier candidate, the published settings first). ``<out>/<model>/chosen.json``
records every candidate's held-out accuracies and the choice; the test sweeps pass the chosen
values to the recipes with ``--recipe-variables``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import RESEARCH, SetupError, run

from sparseml.serialization import atomic_write_text
from utils import fmnist
from utils import results as res

ONE_SHOT = RESEARCH / "recipes" / "one_shot"
# Candidates per method (recipe variables; a dict value stands for the variables it holds);
# the first of each list is tried first and wins ties. CAP's and OBS's damp are absolute (added to F / m), FastCAP's relative to mean(diag F).
GRID: dict[str, dict[str, list[Any]]] = {
    "cap": {
        "damp": [1e-8, 1e-6, 1e-4],
        "fisher_block_size": ["published", 96],
        "loss_ranking": ["cumulative", "per_step"],
    },
    "obs": {"damp": [1e-8, 1e-6, 1e-4]},
    "mfac": {"damp": [1e-8, 1e-6, 1e-4]},
    "fast_cap": {
        "damp": [1e-3, 1e-2, 1e-1],
        "allocation": [  # a dict value sets several variables at once
            {"global_sparsity": True},
            {"global_sparsity": False},
            {"global_sparsity": True, "global_allocation": "losses"},
        ],
        # one Fisher per layer (the empty dict: the recipe's default), or one per 8 output rows
        "fisher_rows": [{}, {"fisher_rows": 8}],
        # one sweep (the recipe's default), or 8 of rising sparsity
        "sweeps": [{}, {"sweeps": 8}],
    },
    "fast_cap_ref": {"damp": [1e-3, 1e-2, 1e-1]},
}
PUBLISHED_BLOCK = {"vit": 192, "resnet": 256}  # CAP's one-shot recipes (ViT, ResNet50d)


def family(model: str) -> str:
    return "resnet" if "resnet" in model else "vit"


def candidates(method: str, model: str, small: bool = False) -> list[dict[str, Any]]:
    """Every candidate setting of ``method`` for ``model`` (one dict of recipe variables);
    ``small`` (the quick run): the first two values of the first variable, the first of the
    others."""
    grid = GRID.get(method, {})
    values = [
        [PUBLISHED_BLOCK[family(model)] if v == "published" else v for v in grid[k]] for k in grid
    ]
    if small:
        values = [v[:2] if i == 0 else v[:1] for i, v in enumerate(values)]
    out = []
    for combo in itertools.product(*values):
        variables: dict[str, Any] = {}
        for key, value in zip(grid, combo):
            variables.update(value if isinstance(value, dict) else {key: value})
        out.append(variables)
    return out


def label(method: str, variables: dict[str, Any]) -> str:
    """The candidate's method name in the held-out rows, e.g. ``cap[damp=1e-08,B=192]``."""
    short = {"fisher_block_size": "B", "loss_ranking": "rank", "global_sparsity": "global",
             "global_allocation": "alloc"}  # fmt: skip
    inner = ",".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else
                     f"{short.get(k, k)}={v}" for k, v in variables.items())  # fmt: skip
    return f"{method}[{inner}]"


def variables_arg(variables: dict[str, Any], recipe: Path) -> list[str]:
    """``--recipe-variables`` for the variables ``recipe`` defines (others are left out)."""
    text = recipe.read_text()
    given = [f"{k}={v}" for k, v in variables.items() if f"\n{k}:" in text]
    return ["--recipe-variables", ",".join(given)] if given else []


def prepare_holdout(data_dir: str | None, out: Path, train: int, holdout: int) -> Path:
    """``out/data_holdout``: training split = the first ``train`` images, test split = the
    next ``holdout`` training images (written once as idx files)."""
    source = fmnist.check_dir(data_dir)
    dest = out / "data_holdout"
    meta = {"source": str(source), "train": train, "holdout": [train, train + holdout]}
    try:
        if json.loads((dest / "subset.json").read_text()) == meta:
            return dest
    except (OSError, ValueError):
        pass
    images, labels = fmnist.load_split(source, "train")
    if train + holdout > len(labels):
        raise SetupError(f"--holdout {holdout}: only {len(labels)} training images")
    tmp = out / "data_holdout.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts = {"train": slice(0, train), "t10k": slice(train, train + holdout)}
    for prefix, part in parts.items():
        fmnist.write_idx(tmp / f"{prefix}-images-idx3-ubyte.gz", images[part])
        fmnist.write_idx(tmp / f"{prefix}-labels-idx1-ubyte.gz", labels[part].astype(np.uint8))
    (tmp / "subset.json").write_text(json.dumps(meta))
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def swept(methods: list[str]) -> list[str]:
    return [m for m in methods if m in GRID]


def jobs(args, model: str, checkpoint: Path, data: Path, out: Path, then: Callable[[], list]):
    """One job: every candidate of every swept method in order, one process each (they share
    the ``heldout`` results folder, which one sweep at a time may write), then
    ``chosen.json``; it returns ``then()`` (the jobs that need the choice)."""

    def job() -> list:
        for method in swept(args.methods):
            for variables in candidates(method, model, args.sweep_grid == "small"):
                candidate(args, model, method, variables, checkpoint, data, out)
        write_choice(args, model, out)
        return then()

    return [job]


def candidate(args, model, method, variables, checkpoint: Path, data: Path, out: Path) -> None:
    folder = out / model / "heldout"
    name = label(method, variables)
    done = res.latest_rows(res.read_rows(folder))
    todo = [s for s in args.sweep_sparsities if res.row_key(name, s) not in done]
    if not todo:
        return
    recipe = ONE_SHOT / f"{method}_fmnist.yaml"
    cmd = [RESEARCH / "one_shot_pruning.py", "--model", model, "--initial-checkpoint"]
    cmd += [checkpoint, "--dataset", fmnist.FMNIST, "--data-dir", data]
    cmd += ["--sparseml-recipe", recipe, "--method", name, "--sparsities", *todo]
    cmd += ["--gs-loader", "-gb", args.gs_batch_size, "--gs-no-aug", "-vb", 500]
    cmd += ["--workers", 0, "--threads", args.threads, "--seed", args.seeds[0], "--no-report"]
    cmd += ["--output", out / model, "--experiment", folder.name, "--overwrite"]
    if args.num_grads and "num_grads:" in recipe.read_text():
        variables = {**variables, "num_grads": args.num_grads}
    cmd += variables_arg(variables, recipe)
    run(cmd, args.threads, f"{model} held-out: {name} at {todo}")


def write_choice(args, model: str, out: Path) -> dict[str, dict[str, Any]]:
    """Pick every swept method's best candidate by its mean held-out top-1; record all."""
    rows = res.latest_rows(res.read_rows(out / model / "heldout"))
    chosen: dict[str, Any] = {}
    for method in swept(args.methods):
        table = []
        for variables in candidates(method, model, args.sweep_grid == "small"):
            name = label(method, variables)
            accs = [
                rows.get(res.row_key(name, s), {}).get("accuracy") for s in args.sweep_sparsities
            ]
            if any(a is None for a in accs):
                raise SetupError(f"{model}: held-out row of {name} missing or not finite")
            table.append({"variables": variables, "accuracy": accs, "mean": float(np.mean(accs))})
        best = max(table, key=lambda c: c["mean"])  # max keeps the first of equal means
        chosen[method] = {"variables": best["variables"], "heldout_mean": best["mean"],
                          "candidates": table}  # fmt: skip
    record = {"sparsities": args.sweep_sparsities, "seed": args.seeds[0], "grid": args.sweep_grid,
              "holdout": args.holdout, "methods": chosen}  # fmt: skip
    atomic_write_text(out / model / "chosen.json", json.dumps(record, indent=1))
    return chosen


def chosen_variables(out: Path, model: str, method: str) -> dict[str, Any]:
    """The recipe variables chosen for ``method`` (``{}``: not swept, the recipe's own)."""
    path = out / model / "chosen.json"
    if not path.is_file():
        return {}
    entry = json.loads(path.read_text())["methods"].get(method)
    return dict(entry["variables"]) if entry else {}
