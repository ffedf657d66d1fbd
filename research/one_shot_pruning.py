#!/usr/bin/env python
"""One-shot pruning sweeps: prune a trained timm model to several sparsities with one recipe.

For each sparsity a copy of the dense model is pruned by the recipe's pruning modifier
(``init_sparsity = final_sparsity = s``, ``manager.apply``), evaluated, and one row is appended
to ``results.jsonl`` / ``results.csv`` in the results folder at once. A rerun skips the rows
already there, so a killed sweep resumes where it stopped. At the end a table is printed and
``accuracy_vs_sparsity.png`` drawn (one curve per method found in the results).

    python research/one_shot_pruning.py --dataset digits --initial-checkpoint dense.pth \
        --sparseml-recipe research/recipes/one_shot/cap_digits.yaml --gs-loader -gb 32 \
        --sparsities 0.5 0.7 0.9 --output output/one_shot --experiment vit_digits_digits
    torchrun --nproc_per_node=2 research/one_shot_pruning.py ...   # gradients from all ranks

Options are timm's (``utils/options.py``, shared with ``sparse_training.py``); CAP's spellings
(``--checkpoint_path``, ``--output_dir DIR``, ``--sparseml_recipe``...) work as hidden aliases.
The results folder is ``<--output>/<--experiment>`` (default ``output/one_shot/<model>_<data>``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import time
from pathlib import Path
from typing import Any

from utils.cli import build_one_shot_parser, parse_one_shot_args
from utils.options import answer_usage_early

if __name__ == "__main__":  # --help and usage errors before torch and timm load
    answer_usage_early(build_one_shot_parser)

from utils.compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

import torch  # noqa: E402
from timm.data import create_loader, resolve_data_config  # noqa: E402
from timm.models import create_model, safe_model_name  # noqa: E402, F401  (tests use create_model)
from timm.utils import random_seed  # noqa: E402

from sparseml.compressed import SUFFIX  # noqa: E402
from sparseml.errors import RecipeError  # noqa: E402
from sparseml.modifiers.quantization import quant_bits_by_layer  # noqa: E402
from sparseml.progress import Progress  # noqa: E402
from sparseml.sparsity import ModuleSparsificationInfo  # noqa: E402
from utils import evaluation as ev  # noqa: E402
from utils import faults  # noqa: E402
from utils import models as _models  # noqa: E402  (also registers vit_digits, resnet_digits)
from utils import one_shot as osp  # noqa: E402
from utils import one_shot_data as osd  # noqa: E402
from utils import results as res  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    check_finite_weights,
    file_digest,
    save_compressed_weights,
    save_state_dict,
)
from utils.class_map import check_class_map, class_names  # noqa: E402
from utils.data import configure_grad_sampler, loader_kwargs, resolve_data_dir  # noqa: E402
from utils.distributed import (  # noqa: E402
    broadcast_model,
    cleanup,
    gather_objects,
    init_distributed,
    is_primary,
    quiet_other_ranks,
)
from utils.errors import SetupError  # noqa: E402
from utils.plots import dataset_label, plot_accuracy  # noqa: E402
from utils.run_dir import hold_folder  # noqa: E402
from utils.weights import read_class_map  # noqa: E402

_logger = logging.getLogger("one_shot")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Options and recipe checks, then one locked sweep: dense row, one row per sparsity."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    _models.check_model_name(args.model)  # before recipe and data work: a typo fails at once
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pruner = check_recipe(args)
    needs_grads = osp.needs_gradients(pruner)
    osd.check_data(args)  # missing data or splits: fail before the model loads
    device = init_distributed(args)
    quiet_other_ranks(args)
    # No `finally`: after a failure on this rank, a barrier here would wait for peers that sit
    # in another collective (a hang); faults.run_main leaves without touching the group.
    with hold_folder(args, args.output_dir, args.output_option):  # one sweep at a time
        rows = sweep(args, pruner, needs_grads, device)
    cleanup(args)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = parse_one_shot_args(argv)
    args.sparsities = osp.check_sparsities(args.sparsities)
    if args.method == res.DENSE:
        raise SetupError(f"--method {res.DENSE!r} is reserved for the dense model's row")
    if re.search(r"[/\\\s\x00]", args.method) or args.method.startswith("."):
        raise SetupError(  # it names the saved files: no folder parts
            f"--method {args.method!r} is not allowed: it names the saved files, so no '/', "
            "'\\', whitespace or leading '.'"
        )
    return args


def check_recipe(args: argparse.Namespace) -> Any:
    """Load the recipe once to fail fast; fill in default sparsities. Returns the modifier."""
    if not Path(args.sparseml_recipe).is_file():
        raise SetupError(f"recipe {args.sparseml_recipe} does not exist")
    manager = osp.load_one_shot_manager(args.sparseml_recipe, None, args.recipe_variables)
    pruner = osp.pruning_modifier(manager)
    args.method = args.method or osp.method_name(pruner)  # a column per method, not per file
    args.quantization = osp.quantization_settings(manager)  # calibrated after each prune
    if args.quantization is not None and args.bn_recalibration_batches:
        raise SetupError(
            "--bn-recalibration-batches does not combine with a quantizing recipe (its "
            "observers are calibrated before the statistics would change); drop one of them"
        )
    if not args.sparsities:
        args.sparsities = [float(pruner.final_sparsity)]
    for s in args.sparsities:  # e.g. an N:M mask allows only s = N/M
        try:
            osp.load_one_shot_manager(args.sparseml_recipe, s, args.recipe_variables)
        except RecipeError as err:
            raise SetupError(f"--sparsities {s:g} does not fit the recipe: {err}") from err
    configure_grad_sampler(args, [pruner])  # a second-order pruner samples training data
    return pruner


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The dense model (``models.build_model``) and the digest of its weights file; NaN/Inf
    weights are refused: pruning scores would be garbage."""
    random_seed(args.seed, 0)  # identical initial weights on every rank
    model = _models.build_model(args)
    source = f"model {args.model!r}"
    digest = ""
    if args.initial_checkpoint:
        source = f"--initial-checkpoint {args.initial_checkpoint}"
        digest = file_digest(args.initial_checkpoint)
    check_finite_weights(model, source)
    return model, digest


def artifacts(args, sparsity: float, every: bool = False) -> dict[str, Path]:
    """The files ``--save-model`` and ``--save-compressed`` ask for at ``sparsity`` (``every``:
    both kinds, asked for or not)."""
    name = f"{safe_model_name(args.model)}_{args.method}_sparsity={sparsity:g}"
    stem = Path(args.output_dir) / name
    kinds = {"model": (args.save_model, ".pth"), "compressed": (args.save_compressed, SUFFIX)}
    return {k: Path(f"{stem}{ext}") for k, (asked, ext) in kinds.items() if asked or every}


def plan_sweep(args, dense_settings: dict, method_settings: dict) -> dict[str, Any]:
    """Rank 0 reads the results and decides what is left to do; every rank gets the plan."""
    plan: dict[str, Any] = {"error": None, "dense": True, "sparsities": []}
    if is_primary(args):
        try:
            plan.update(
                res.plan_resume(
                    args.output_dir,
                    args.method,
                    args.sparsities,
                    {res.DENSE: dense_settings, args.method: method_settings},
                    args.overwrite,
                    files=lambda sparsity, every: list(artifacts(args, sparsity, every).values()),
                )
            )
        except SetupError as err:
            plan["error"] = str(err)
    plan = gather_objects(args, plan)[0]
    if plan["error"]:
        raise SetupError(plan["error"])
    return plan


def prune_one(args, dense, sparsity: float, device, loaders: dict, cache) -> dict[str, Any]:
    """Prune a copy of ``dense`` to ``sparsity``; evaluate it; return the row (and the model)."""
    random_seed(args.seed, args.rank)  # same gradient batches for every sparsity
    manager = osp.load_one_shot_manager(args.sparseml_recipe, sparsity, args.recipe_variables)
    pruner = osp.pruning_modifier(manager)
    model = copy.deepcopy(dense)
    kwargs = {}
    if osp.needs_gradients(pruner):
        kwargs["grad_sampler"] = osp.grad_sampler_for(loaders["gs"])
    if cache is not None:
        kwargs["sweep_cache"] = cache  # Fisher (and CAP order) built once per method
    if "calib" in loaders:
        kwargs["calib_loader"] = loaders["calib"]
    ev.reset_peak_memory(device)
    start = time.perf_counter()
    manager.apply(model, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak, kind = ev.peak_memory_mb(device)
    extra = {}
    if args.bn_recalibration_batches:
        start = time.perf_counter()
        norms = ev.recalibrate_batchnorm(
            model, loaders["bn"], args.bn_recalibration_batches, device
        )
        extra = {"bn_recalibrated": norms, "bn_seconds": time.perf_counter() - start}
        if not norms:
            _logger.warning("--bn-recalibration-batches: %s has no BatchNorm", args.model)
    start = time.perf_counter()
    metrics = ev.evaluate(model, loaders["val"], device)
    per_layer, measured = ev.layer_sparsity(model, [r.name for r in pruner.refs])
    summary = ModuleSparsificationInfo(model).params_summary
    row = osp.make_row(
        args,
        args.method,
        type(pruner).__name__,
        sparsity,
        metrics,
        measured_sparsity=measured,
        prunable_sparsity=summary["prunable_sparsity_percent"] / 100.0,
        seconds=seconds,
        eval_seconds=time.perf_counter() - start,
        peak_mem_mb=peak,
        mem_kind=kind,
        layer_sparsity=per_layer,
        phase_seconds=dict(getattr(pruner, "timings", None) or {}),
        **extra,
    )
    return {"row": row, "model": model, "quantized_layers": len(quant_bits_by_layer(manager))}


def build_loaders(args, model, device, needs_grads: bool) -> tuple[dict, dict]:
    name, root = resolve_data_dir(args.dataset, args.data_dir)
    cfg = resolve_data_config({"img_size": args.img_size}, model=model, verbose=is_primary(args))
    options = loader_kwargs(args, cfg, device)
    classes = class_names(name, root, [args.train_split, args.val_split])  # one map for all
    if args.initial_checkpoint:  # labels must mean what they meant in training
        saved = read_class_map(args.initial_checkpoint, "--initial-checkpoint")
        check_class_map(saved, classes, f"--initial-checkpoint {args.initial_checkpoint}")
    shard = dict(rank=args.rank, world=args.world_size, classes=classes)
    val = osd.open_dataset(name, root, args.val_split, False, **shard)
    loaders = {
        "val": create_loader(
            val, batch_size=args.validation_batch_size, is_training=False, **options
        )
    }
    if (
        getattr(args, "quantization", None) is not None
    ):  # one pass over the training shard, no augmentation
        calib = osd.open_dataset(name, root, args.train_split, False, **shard)
        loaders["calib"] = create_loader(
            calib, batch_size=args.validation_batch_size, is_training=False, **options
        )
    if args.bn_recalibration_batches:  # training images as evaluated: no augmentation
        bn = osd.open_dataset(name, root, args.train_split, False, **shard)
        loaders["bn"] = create_loader(bn, batch_size=args.batch_size, is_training=False, **options)
        osd.check_bn_batches(loaders["bn"], args)
    if needs_grads:
        train = osd.open_dataset(name, root, args.train_split, True, **shard)
        loaders["gs"] = osd.GradSamplerData(
            train, options, args.gs_batch_size, augment=not args.gs_no_aug
        )
        loaders["gs"].loader(args.gs_batch_size)  # batch size check before any work
    return loaders, cfg


def finish(args, out_dir: Path, wandb: Any) -> list[dict]:
    rows = list(res.latest_rows(res.read_rows(out_dir)).values())
    print(res.format_table(rows))
    plot = plot_accuracy(rows, out_dir / res.PLOT, args.model, dataset_label(args))
    print(f"Results: {out_dir / res.JSONL}, {out_dir / res.CSV}; plot: {plot}")
    if wandb is not None:
        res.wandb_final(wandb, rows, plot)
    return rows


def sweep_settings(args, pruner, digest: str, needs_grads: bool) -> tuple[dict, dict]:
    """What the dense row and the method's rows were made with: a rerun with other settings
    is refused (``results.plan_resume``) instead of mixing rows of two setups."""
    dense_settings = {
        "model": args.model,
        "checkpoint": digest,
        "pretrained": args.pretrained,
        "model_kwargs": dict(args.model_kwargs),
        "num_classes": args.num_classes,
        "img_size": args.img_size,
        "dataset": args.dataset,
        "val_split": args.val_split,
    }
    method_settings = {**dense_settings, **osp.modifier_settings(pruner), "seed": args.seed}
    if getattr(args, "quantization", None) is not None:
        method_settings["quantization"] = args.quantization
    if args.bn_recalibration_batches:  # absent when off: earlier rows stay valid
        method_settings.update(
            bn_recalibration_batches=args.bn_recalibration_batches,
            batch_size=args.batch_size,
            train_split=args.train_split,
        )
    if needs_grads:
        method_settings.update(
            gs_batch_size=args.gs_batch_size,
            gs_aug=not args.gs_no_aug,
            train_split=args.train_split,
            world_size=args.world_size,
        )
    return dense_settings, method_settings


def open_results(args) -> tuple[Path, Any]:
    """The results folder (created on rank 0) and the W&B run, if any."""
    out_dir = Path(args.output_dir)
    if not is_primary(args):
        return out_dir, None
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.log_wandb:
        return out_dir, None
    config = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | list)}
    config["recipe_text"] = Path(args.sparseml_recipe).read_text()
    return out_dir, res.wandb_start(
        args.wandb_project or "cap_one_shot", args.method, config, out_dir
    )


def evaluate_dense(args, dense, loaders: dict, device, out_dir: Path, settings: dict) -> None:
    """The dense model's row (sparsity 0), appended at once."""
    start = time.perf_counter()
    metrics = ev.evaluate(dense, loaders["val"], device)
    row = osp.make_row(args, res.DENSE, "", 0.0, metrics, eval_seconds=time.perf_counter() - start)
    row.update(measured_sparsity=0.0, seconds=0.0, settings=settings)
    if is_primary(args):
        res.append_row(out_dir, row)
    _logger.info("Dense: top-1 %.2f%%, loss %.4f", metrics["accuracy"], metrics["loss"])


def sweep(args, pruner, needs_grads: bool, device: torch.device) -> list[dict[str, Any]]:
    """Dense row, then one pruned copy and one row per sparsity not yet in the results."""
    dense, digest = build_model(args)
    dense.to(device).eval()
    broadcast_model(dense)
    dense_settings, method_settings = sweep_settings(args, pruner, digest, needs_grads)
    plan = plan_sweep(args, dense_settings, method_settings)
    out_dir, wandb = open_results(args)
    if plan["dense"] or plan["sparsities"]:
        loaders, _ = build_loaders(args, dense, device, needs_grads)
    if plan["dense"]:
        evaluate_dense(args, dense, loaders, device, out_dir, dense_settings)
    # Each sparsity prunes a fresh copy of the same dense model, so with one recomputation the
    # second-order modifiers reuse their gradients and Fisher blocks through this dict.
    cache = None if args.no_sweep_cache else {}
    progress = Progress(
        f"{args.method} sweep", len(plan["sparsities"]), "sparsities", logger=_logger
    )
    for sparsity in plan["sparsities"]:
        done = prune_one(args, dense, sparsity, device, loaders, cache)
        row = {**done["row"], "settings": method_settings}
        nan = float("nan")  # rows hold None for values that were not finite
        _logger.info(
            "%s @ %.3f: top-1 %.2f%%, loss %.4f, measured sparsity %.4f, %.1f s",
            args.method,
            sparsity,
            nan if row["accuracy"] is None else row["accuracy"],
            nan if row["loss"] is None else row["loss"],
            row["measured_sparsity"],
            row["seconds"],
        )
        if is_primary(args):
            # Artifacts before the row: a rerun redoes a sparsity without its row or files.
            files = artifacts(args, sparsity)
            if "model" in files:
                save_state_dict(done["model"], files["model"])
            if "compressed" in files:
                save_compressed_weights(
                    done["model"], files["compressed"], done["quantized_layers"]
                )
            res.append_row(out_dir, row)
            if wandb is not None:
                keys = ("accuracy", "top5", "loss", "measured_sparsity", "seconds")
                wandb.log({"sparsity": sparsity, **{f"val/{k}": row[k] for k in keys}})
        del done
        progress.update()
    progress.close()
    if not is_primary(args):
        return []
    if args.no_report:
        if wandb is not None:
            wandb.finish()
        return list(res.latest_rows(res.read_rows(out_dir)).values())
    return finish(args, out_dir, wandb)


if __name__ == "__main__":
    faults.run_main(main)
