"""Quality on Fashion-MNIST: dense training, one-shot sweeps over seeds, a short gradual run.

For every model (``--models``): train it dense once (``research/sparse_training.py`` with
``research/configs/fmnist_<family>.yaml``; cached in ``<out>/<model>/dense.pth`` once the
training wrote ``training_complete.json``, resumed when interrupted), then prune it one-shot
with every method (``research/recipes/one_shot/<method>_fmnist.yaml``) to every sparsity, once
per seed of the gradient sample (``--seed`` of ``one_shot_pruning.py``: the grad sampler's
stream), plus 2:4 where ``<method>_fmnist_2to4.yaml`` exists. Methods that draw no gradients
(magnitude) run for the first seed only. Rows go to ``<out>/<model>/seed<k>/results.jsonl``
(one-shot) and ``<out>/<model>/gradual.jsonl`` (GM vs CAP gradually to 90% with fine-tuning). A rerun
skips finished rows without starting a process for them.

A new method joins by its recipe alone: ``--methods ... woodfisher`` runs
``one_shot/woodfisher_fmnist.yaml`` (and ``woodfisher_fmnist_2to4.yaml`` if present).

``--train-limit`` / ``--val-limit`` (the quick mode) write the first N images of each split as
idx files under ``<out>/quality/data`` and use those; without them the full 60,000 / 10,000 are
used. The gradual runs train on the first ``--gradual-train-limit`` images (20,000).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bench_heldout as held
import numpy as np
import stale_rows
from bench_common import RESEARCH, ROOT, SetupError, guarded, in_parallel, record, records, run

from utils import dense_cache, fmnist
from utils import results as res

ONE_SHOT = RESEARCH / "recipes" / "one_shot"
GRADUAL = RESEARCH / "recipes" / "gradual_pruning"
NO_GRADIENTS = {"gm"}  # magnitude pruning: the seed changes nothing
# Comparison rows run for the first seed only (they cost a process per seed): the reference
# FastCAP and the BatchNorm-recalibrated (+bn) rows.
FIRST_SEED_ONLY = {"fast_cap_ref"}
RECORDS = threading.Lock()  # jobs run on threads: one append to a shared record file at a time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (e.g. research/bench/results)")
    p.add_argument("--data-dir", default=None, help="idx files (default: $FMNIST_DIR, Debian's)")
    p.add_argument("--models", nargs="+", default=["vit_fmnist", "resnet_fmnist"])
    p.add_argument(
        "--methods", nargs="+", default=["gm", "obs", "mfac", "fast_cap_ref", "fast_cap", "cap"]
    )
    p.add_argument("--nm-methods", nargs="*", default=None, help="2:4 runs (default: --methods)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    p.add_argument(
        "--holdout", type=int, default=5000,
        help="last N training images held out to choose the settings (default 5000)",
    )  # fmt: skip
    p.add_argument(
        "--sweep-sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95],
        help="sparsities of the held-out settings sweep (chosen by their mean top-1)",
    )  # fmt: skip
    p.add_argument(
        "--sweep-grid", choices=["full", "small"], default="full",
        help="held-out candidates (bench_heldout.GRID); small: 2 per method (the quick run)",
    )  # fmt: skip
    p.add_argument(
        "--bn-batches", type=int, default=50,
        help="ResNets: a +bn row per method with BatchNorm recalibrated over N batches of 128 "
        "training images (0: no such rows)",
    )  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--seed-methods", nargs="*", default=None,
        help="jobs run for the seeds after the first (default: all; e.g. gm obs cap)",
    )  # fmt: skip
    p.add_argument(
        "--epochs", type=int, default=None,
        help="dense training epochs (default: the config's, research/configs/fmnist_*.yaml)",
    )  # fmt: skip
    p.add_argument("--train-limit", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--val-limit", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--num-grads", type=int, default=0, help="m of every method (0: recipes')")
    p.add_argument("--gs-batch-size", type=int, default=16, help="images per gradient sample")
    p.add_argument("--gradual-models", nargs="*", default=None, help="default: the first model")
    p.add_argument("--gradual-methods", nargs="*", default=["gm", "cap"])
    p.add_argument(
        "--gradual-epochs", type=int, default=3,
        help="pruning steps at the start of every epoch but the last (default 3: two steps)",
    )  # fmt: skip
    p.add_argument(
        "--jobs", type=int, default=1,
        help="processes at a time, each with --threads threads (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--gradual-train-limit", type=int, default=0, help="first N training images (0: all)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1)")
    args = p.parse_args(argv)
    if args.gradual_models is None:
        args.gradual_models = args.models[:1]
    for option in ("holdout", "bn_batches"):
        if getattr(args, option) < 0:
            p.error(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    for option in ("epochs", "gradual_epochs", "gs_batch_size", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    return args


def prepare_data(data_dir: str | None, out: Path, name: str, train: int, val: int) -> Path:
    """The idx folder to use: the real one, or its first ``train`` / ``val`` images written
    once as idx files to ``out/<name>`` (0 = all of a split)."""
    source = fmnist.check_dir(data_dir)  # SetupError naming the install command
    if not (train or val):
        return source
    dest = out / name
    meta = {"source": str(source), "train": train, "val": val}
    if read_json(dest / "subset.json") == meta:
        return dest
    tmp = out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for prefix, limit in (("train", train), ("t10k", val)):
        images, labels = fmnist.load_split(source, prefix)
        n = limit or len(labels)
        fmnist.write_idx(tmp / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        fmnist.write_idx(tmp / f"{prefix}-labels-idx1-ubyte.gz", labels[:n].astype(np.uint8))
    (tmp / "subset.json").write_text(json.dumps(meta))
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def read_json(path: Path) -> object:
    """The JSON in ``path``; None when it is missing or unreadable (then treated as stale)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def config_for(model: str) -> Path:
    family = "resnet" if "resnet" in model else "vit"
    return RESEARCH / "configs" / f"fmnist_{family}.yaml"


def train_once(cmd: list[str], folder: Path, threads: int, what: str) -> None:
    """Run a training into ``folder`` unless it completed; resume an interrupted one."""
    try:
        dense_cache.complete_training(folder, cmd, lambda full: run(full, threads, what))
    except dense_cache.DenseCacheError as err:
        raise SetupError(f"{what}: {err}") from err


def dense_model(args, model: str, data: Path, out: Path) -> Path:
    """The cached dense checkpoint of ``model`` (``utils.dense_cache``, as the one-shot
    launcher's), trained first if needed.

    ``<out>/<model>/dense.json`` records what it was trained with (epochs, config, data); when
    that changed, the model's whole folder (its one-shot and gradual results too) is stale
    and removed, so no row ever mixes two dense models.
    """
    folder, checkpoint = out / model / "dense_training", out / model / "dense.pth"
    subset = data / "subset.json"
    want = {
        "epochs": args.epochs,
        "config": config_for(model).read_text(),
        "data": read_json(subset) if subset.is_file() else str(data),
    }
    meta = out / model / "dense.json"
    cached = dense_cache.is_cached(checkpoint, folder) and read_json(meta) == want
    cmd = [RESEARCH / "sparse_training.py", "--config", config_for(model), "--model", model]
    cmd += ["--dataset", fmnist.FMNIST, "--data-dir", data]
    cmd += ["--epochs", args.epochs] if args.epochs else []
    cmd += ["--workers", 0, "--output", out / model, "--experiment", "dense_training"]
    cmd += ["--log-interval", 1000, "--save-last"]
    epochs = args.epochs or "the config's"
    what = f"dense training of {model} ({epochs} epochs)"
    start = time.perf_counter()
    try:
        dense_cache.ensure_dense(
            checkpoint,
            folder,
            cmd,
            run=lambda full: run(full, args.threads, what),
            settings=want,
            record=meta,
            stale=[out / model],
        )
    except dense_cache.DenseCacheError as err:
        raise SetupError(f"{what}: {err}") from err
    if not cached:
        with RECORDS:
            record(out / "training.jsonl", f"{model}|dense", {
                "model": model, "epochs": args.epochs, "seconds": time.perf_counter() - start,
            })  # fmt: skip
    return checkpoint


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (as the user would type it)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sweep_jobs(args, chosen: dict | None = None, model: str = "") -> list[tuple]:
    """(method name, recipe, sparsities, draws gradients, recipe variables, BN batches) of
    every one-shot job; ``chosen``: the held-out choices per method (``bench_heldout``). CAP
    also runs with the other loss ranking (``cap_<ranking>``); a ResNet gets a ``<method>+bn``
    job per method with BatchNorm recalibrated (``--bn-batches``) at the three highest
    sparsities."""
    chosen = chosen or {}
    bn = args.bn_batches if "resnet" in model else 0
    jobs = []
    for method in args.methods:
        recipe = ONE_SHOT / f"{method}_fmnist.yaml"
        if not recipe.is_file():
            raise SetupError(f"--methods {method}: no recipe {shown(recipe)}")
        grads, variables = method not in NO_GRADIENTS, chosen.get(method, {})
        jobs.append((method, recipe, args.sparsities, grads, variables, 0))
        if "loss_ranking" in variables:
            other = {
                **variables,
                "loss_ranking": stale_rows.OTHER_RANKING[variables["loss_ranking"]],
            }
            jobs.append((f"{method}_{other['loss_ranking']}", recipe, args.sparsities, grads,
                         other, 0))  # fmt: skip
        if bn:  # at the three highest sparsities, where BatchNorm statistics drift most
            high = sorted(args.sparsities)[-3:]
            jobs.append((f"{method}+bn", recipe, high, grads, variables, bn))
        nm = ONE_SHOT / f"{method}_fmnist_2to4.yaml"
        if nm.is_file() and (args.nm_methods is None or method in args.nm_methods):
            jobs.append((f"{method}_2to4", nm, [0.5], grads, variables, 0))
    return jobs


def one_shot(args, model: str, checkpoint: Path, data: Path, out: Path) -> list[Callable[[], None]]:
    """One job per seed (each its own folder, its methods in order)."""
    # Rows are skipped by (method, sparsity): when the gradient settings change, the earlier
    # sweeps no longer count; when a method's held-out choice changes, its rows no longer
    # count (`stale_rows`; one_shot_pruning.py also recomputes any row whose recipe
    # settings differ: --overwrite).
    chosen = {m: held.chosen_variables(out, model, m) for m in args.methods}
    want = {"num_grads": args.num_grads, "gs_batch_size": args.gs_batch_size,
            "chosen": chosen, "bn_batches": args.bn_batches}  # fmt: skip
    stale_rows.refresh(out / model, want)
    return [
        (
            lambda seed=seed, first=(i == 0): sweep(
                args, model, checkpoint, data, out, seed, first, chosen
            )
        )  # fmt: skip
        for i, seed in enumerate(args.seeds)
    ]


def sweep(args, model, checkpoint: Path, data: Path, out: Path, seed: int, first: bool, chosen):
    """Every one-shot job of one seed, in order (one process at a time writes its folder)."""
    folder = out / model / f"seed{seed}"
    done = res.latest_rows(res.read_rows(folder))
    for method, recipe, sparsities, grads, variables, bn in sweep_jobs(args, chosen, model):
        if not first and (not grads or method in FIRST_SEED_ONLY or method.endswith("+bn")):
            continue
        if not first and args.seed_methods is not None and method not in args.seed_methods:
            continue
        todo = [s for s in sparsities if res.row_key(method, s) not in done]
        if not todo:
            continue
        cmd = [RESEARCH / "one_shot_pruning.py", "--model", model, "--initial-checkpoint"]
        cmd += [checkpoint, "--dataset", fmnist.FMNIST, "--data-dir", data]
        cmd += ["--sparseml-recipe", recipe, "--method", method, "--sparsities", *todo]
        cmd += ["--gs-loader", "-gb", args.gs_batch_size, "--gs-no-aug", "-vb", 500]
        cmd += ["--workers", 0, "--threads", args.threads, "--seed", seed, "--no-report"]
        cmd += ["--output", out / model, "--experiment", folder.name, "--overwrite"]
        if bn:
            cmd += ["--bn-recalibration-batches", bn, "-b", 128]
        if args.num_grads:
            variables = {**variables, "num_grads": args.num_grads}
        cmd += held.variables_arg(variables, recipe)
        run(cmd, args.threads, f"{model} seed {seed}: one-shot {method} at {todo}")


def number(text: str | None, scale: float = 1.0) -> float | None:
    try:
        value = float(text) * scale
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None


def final_row(summary: Path) -> dict[str, str]:
    with summary.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SetupError(f"{summary} holds no epoch")
    return rows[-1]


def gradual(args, model: str, checkpoint: Path, data: Path, out: Path) -> list[Callable[[], None]]:
    """One job per method of the gradual run (each its own folder)."""
    return [
        (lambda method=method: gradual_run(args, model, method, checkpoint, data, out))
        for method in args.gradual_methods
    ]


def gradual_run(args, model: str, method: str, checkpoint: Path, data: Path, out: Path) -> None:
    path = out / model / "gradual.jsonl"
    recipe = GRADUAL / f"{method}_fmnist.yaml"
    chosen = {k: v for k, v in held.chosen_variables(out, model, method).items()
              if f"\n{k}:" in recipe.read_text()}  # fmt: skip
    tag = "".join(f"_{held.label('', {k: v})[1:-1]}" for k, v in chosen.items())
    key = f"{model}|{method}|{args.gradual_epochs}|m={args.num_grads}|n={data.name}{tag}"
    if key in records(path):
        return
    # One folder per setting of the key: a finished run with other settings is never reused.
    m = f"_m{args.num_grads}" if args.num_grads else ""
    folder = out / model / f"gradual_{method}_{args.gradual_epochs}ep{m}{tag}"
    cmd = [RESEARCH / "sparse_training.py", "--config", config_for(model), "--model", model]
    cmd += ["--dataset", fmnist.FMNIST, "--data-dir", data, "--initial-checkpoint", checkpoint]
    cmd += ["--sparseml-recipe", recipe, "--workers", 0, "--output", out / model]
    cmd += ["--experiment", folder.name, "--log-interval", 1000, "--save-last"]
    # Pruning steps at epochs 0..E-2, the last epoch (at least) fine-tunes the sparse model.
    end = max(0, args.gradual_epochs - 2)
    variables = f"num_epochs={args.gradual_epochs},pruning_end={end}"
    if args.num_grads and "num_grads:" in recipe.read_text():
        variables += f",num_grads={args.num_grads}"
    variables += "".join(f",{k}={v}" for k, v in chosen.items())
    cmd += ["--recipe-variables", variables]
    start = time.perf_counter()
    what = f"{model}: gradual {method} to 90% ({args.gradual_epochs} epochs)"
    train_once(cmd, folder, args.threads, what)
    last = final_row(folder / "summary.csv")
    with RECORDS:
        record(path, key, {
            "model": model, "method": method, "epochs": args.gradual_epochs, "settings": chosen,
            "accuracy": number(last.get("eval_top1")), "sparsity": number(last.get("sparsity")),
            "prunable_sparsity": number(last.get("prunable_sparsity_percent"), 0.01),
            "seconds": time.perf_counter() - start,
        })  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out) / "quality"
    out.mkdir(parents=True, exist_ok=True)
    # the last --holdout training images choose the settings; the rest train and sample
    source = fmnist.check_dir(args.data_dir)
    total = len(fmnist.read_idx(fmnist.idx_file(source, "train", "labels-idx1")))
    train = min(args.train_limit or total, total) - args.holdout
    if train < 1:
        raise SetupError(f"--holdout {args.holdout} leaves no training image (of {total})")
    data = prepare_data(args.data_dir, out, "data", train if args.holdout else args.train_limit,
                        args.val_limit)  # fmt: skip
    holdout = (
        held.prepare_holdout(args.data_dir, out, train, args.holdout) if args.holdout else None
    )
    # the gradual runs may train on fewer images (they are several epochs long); same test set
    limit = min(args.gradual_train_limit or train, train)
    small = (
        data
        if limit == train
        else prepare_data(args.data_dir, out, "data_gradual", limit, args.val_limit)
    )
    sweep_jobs(args)  # every recipe exists: fail before hours of work
    for method in args.gradual_methods:
        recipe = GRADUAL / f"{method}_fmnist.yaml"
        if not recipe.is_file():
            raise SetupError(f"--gradual-methods {method}: no recipe {shown(recipe)}")

    def chain(model: str) -> list[Callable[[], None]]:
        """Train ``model`` dense (or find it cached); the held-out settings sweep, then its
        one-shot and gradual jobs follow."""
        checkpoint = dense_model(args, model, data, out)

        def then() -> list[Callable[[], None]]:
            jobs = one_shot(args, model, checkpoint, data, out) if model in args.models else []
            if model in args.gradual_models:
                jobs += gradual(args, model, checkpoint, small, out)
            return jobs

        if holdout is None:
            return then()
        return held.jobs(args, model, checkpoint, holdout, out, then)

    models = list(dict.fromkeys([*args.models, *args.gradual_models]))
    in_parallel([(lambda model=model: chain(model)) for model in models], args.jobs)


if __name__ == "__main__":
    guarded(main)
