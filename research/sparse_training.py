#!/usr/bin/env python
"""Gradual sparse training of timm models driven by a SparseML-style recipe.

A thin version of timm's ``train.py`` with CAP's additions: the recipe manager wraps the
optimizer so modifiers (pruning, LR schedule) fire inside ``optimizer.step()``; an optional
grad-sampler loader feeds second-order pruners; checkpoints also hold the masks, so ``--resume``
continues with identical masks and schedule. Without ``--sparseml-recipe`` it trains dense.

    python research/sparse_training.py --config research/configs/digits_vit.yaml \
        --dataset digits --sparseml-recipe research/recipes/gradual_pruning/gm_digits.yaml
    torchrun --nproc_per_node=2 research/sparse_training.py ...   # or torch.distributed.launch
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from utils.cli import build_parser, parse_args
from utils.options import answer_usage_early

if __name__ == "__main__":  # --help and usage errors before torch and timm load
    answer_usage_early(build_parser)

from utils.compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

import torch  # noqa: E402
from timm.models import safe_model_name  # noqa: E402
from timm.utils import distribute_bn, random_seed  # noqa: E402

from sparseml.errors import RecipeError  # noqa: E402
from sparseml.sparsity import ModuleSparsificationInfo  # noqa: E402
from utils import checkpoint as ckpt_io  # noqa: E402
from utils import faults, resume, training  # noqa: E402
from utils import logging_utils as logs  # noqa: E402
from utils.checkpoint_hist import CheckpointHistory  # noqa: E402
from utils.class_map import check_class_map, dataset_class_names  # noqa: E402
from utils.data import configure_grad_sampler, create_datasets, sampler_batches  # noqa: E402
from utils.distributed import (  # noqa: E402
    cleanup,
    gather_objects,
    init_distributed,
    is_primary,
    quiet_other_ranks,
)
from utils.engine import check_finite_metrics, train_one_epoch, validate  # noqa: E402
from utils.errors import SetupError  # noqa: E402
from utils.models import check_model_name  # noqa: E402
from utils.plots import PLOT_TRAINING, dataset_label, plot_training  # noqa: E402
from utils.run_dir import claim_training_dir  # noqa: E402
from utils.run_end import (  # noqa: E402
    COMPLETE,
    mark_complete,
    report_finished,
    report_stop,
    settle_files,
)
from utils.summary import read_summary, summary_row, write_summary_row  # noqa: E402

_logger = logging.getLogger("sparse_training")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Recipe and checkpoint checks, data, model, recipe wiring, run folder, resume, epochs.

    Everything a bad input can stop happens before the run folder is claimed, so a refused
    run (or the resume of a finished one) changes no file.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    check_model_name(args.model)  # before data and recipe work: a typo fails at once
    manager = load_recipe(args)
    point = resume.read_point(args, has_recipe=manager is not None)
    train_ds, eval_ds = create_datasets(args)
    classes = dataset_class_names(train_ds)  # one map for both splits, saved in checkpoints
    if point is not None:
        check_class_map(point.class_map, classes, f"--resume {args.resume}")
    device = init_distributed(args)
    quiet_other_ranks(args)
    random_seed(args.seed, args.rank)

    run = training.build_training(args, device, train_ds, eval_ds)
    run.update(manager=manager, classes=classes, wandb=None, hist=None, out_dir=None)
    start_epoch = point.start_epoch if point is not None else args.start_epoch or 0
    if manager is not None:
        wire_recipe(args, run, train_ds, device, start_epoch)
    if resume.finished(point, run["model"], run["num_epochs"]):
        return report_finished(args, point, run["num_epochs"])
    run["out_dir"], run_lock = claim_training_dir(args, run["cfg"]["input_size"][-1])
    start_run_folder(args, run, point)
    resume.restore(point, args, run)
    if run["hist"] is not None and point is not None:  # what a kill after its files cut off
        settle_files(args, run["out_dir"], run["hist"])

    train_metrics, eval_metrics = train(args, run, start_epoch, argv)
    if manager is not None:
        manager.finalize(run["model"])
    if run["wandb"] is not None:
        run["wandb"].finish()
    _logger.info("Training completed: %s", eval_metrics)
    cleanup(args)
    if run_lock is not None:
        run_lock.release()
    return {"out_dir": run["out_dir"], "train": train_metrics, "eval": eval_metrics}


def load_recipe(args: Any) -> Any:
    """The recipe manager, or None for dense training. Bad recipes fail here, before training."""
    if not args.sparseml_recipe:
        return None
    if not Path(args.sparseml_recipe).is_file():
        raise SetupError(f"recipe {args.sparseml_recipe} does not exist")
    from sparseml.pytorch.optim import ScheduledModifierManager

    manager = ScheduledModifierManager.from_yaml(
        args.sparseml_recipe, recipe_variables=args.recipe_variables or None
    )
    configure_grad_sampler(args, manager.pruning_modifiers)
    set_run_length(args, manager)
    return manager


def set_run_length(args: Any, manager: Any) -> None:
    """The recipe's epoch range sets the run length (as in CAP): it overrides ``--epochs``.

    Set before timm's scheduler is built, so a timm LR schedule spans the recipe's epochs too.
    A recipe without epochs (``max_epochs`` -1) leaves ``--epochs``.
    """
    if manager.max_epochs <= 0 or manager.max_epochs == args.epochs:
        return
    if int(os.environ.get("RANK", "0")) == 0:  # before init_distributed: rank from torchrun
        _logger.info(
            "Recipe %s sets the run length: %d epochs (--epochs %d ignored)",
            args.sparseml_recipe,
            manager.max_epochs,
            args.epochs,
        )
    args.epochs = manager.max_epochs


def wire_manager(args, manager, model, optimizer, gs_builder, gs_loss, updates, start_epoch):
    """Wrap the optimizer; return it with the epoch count and whether timm drives the LR."""
    kwargs = {}
    if gs_builder is not None:
        kwargs["grad_sampler"] = {"data_loader_builder": gs_builder, "loss_fn": gs_loss}
    # The recipe set args.epochs (set_run_length); a pruning modifier that the run would still
    # cut short (it ends in the last epoch) is refused here, before any work.
    recipe_sets_lr = bool(manager.learning_rate_modifiers)
    num_epochs = args.epochs
    try:
        manager.check_run_length(num_epochs, updates)
    except RecipeError as err:
        if manager.max_epochs != num_epochs:  # --epochs set the length: the message fits
            raise
        raise RecipeError(
            f"{err} (the recipe's epoch range sets the run length, {num_epochs} epochs, "
            "overriding --epochs: extend its EpochRangeModifier end_epoch)"
        ) from err
    # The unwrapped model: stable parameter names and grad-sampler passes outside DDP.
    optimizer = manager.modify(
        model, optimizer, steps_per_epoch=updates, epoch=start_epoch, **kwargs
    )
    if recipe_sets_lr:
        names = sorted({type(m).__name__ for m in manager.learning_rate_modifiers})
        _logger.info(
            "Recipe sets the learning rate (%s): timm scheduler off, %d epochs",
            ", ".join(names),
            num_epochs,
        )
    return optimizer, num_epochs, not recipe_sets_lr


def end_of_epoch(args, state: dict, epoch: int, train_metrics, eval_metrics) -> None:
    """Rank-0 bookkeeping: summary row, W&B, sparsity JSON, checkpoints (all ranks call it)."""
    model, manager, out_dir = state["model"], state["manager"], state["out_dir"]
    # Collective (every rank): per-rank RNG states and manager state (e.g. M-FAC's buffered
    # gradients, sharded over ranks) for exact resume, and a mask check.
    mine = manager.rank_state_dict() if manager is not None else {}
    gathered = gather_objects(args, (ckpt_io.rng_state(), logs.zero_pattern_digest(model), mine))
    if not is_primary(args):
        return
    rng = [g[0] for g in gathered]
    if args.distributed:
        logs.report_rank_agreement(epoch, [g[1] for g in gathered])
    sparsity = logs.scheduled_sparsity(manager, epoch)
    summary = ModuleSparsificationInfo(model).params_summary
    lrs = [g["lr"] for g in state["optimizer"].param_groups]
    row = summary_row(epoch, train_metrics, eval_metrics, lr=sum(lrs) / len(lrs))
    row.update(sparsity=sparsity, **summary)
    write_summary_row(out_dir / "summary.csv", row)
    plot_training(  # rewritten (atomically) every epoch: readable while the run goes on
        read_summary(out_dir / "summary.csv"),
        out_dir / PLOT_TRAINING,
        args.model,
        dataset_label(args),
        metric=args.eval_metric,
        pruning=manager is not None and bool(manager.pruning_modifiers),
    )
    if state["wandb"] is not None:
        hists = {}
        if args.log_param_histogram:
            hists = logs.param_histograms(state["wandb"], model)
        state["wandb"].log({**row, **hists})
    _logger.info(
        "Epoch %d: top1 %.2f, scheduled sparsity %.4f, prunable sparsity %.2f%%",
        epoch,
        eval_metrics["top1"],
        sparsity,
        summary["prunable_sparsity_percent"],
    )
    if args.log_sparsity and logs.is_update_epoch(manager, epoch):
        logs.write_sparsity_distribution(out_dir, epoch, model)
    name = safe_model_name(args.model)
    metric = eval_metrics[args.eval_metric]
    best_path = state["hist"].offer(epoch, sparsity, metric)  # sparsest, then best metric
    save = dict(
        model=model,
        optimizer=state["optimizer"],
        epoch=epoch,
        arch=args.model,
        scaler=state["scaler"],
        ema=state["ema"].module if state["ema"] is not None else None,
        manager=manager,
        metric=metric,
        rng=rng,
        checkpoint_hist=state["hist"].state_dict(),
        rank_state=[g[2] for g in gathered],
        class_map=state.get("classes"),
    )
    # The best-history file first: every other checkpoint lists it, so a kill or a full disk
    # before one of them leaves the previous epoch's files, whose history still holds.
    if best_path is not None:
        ckpt_io.save_checkpoint(best_path, **save)
    if args.checkpoint_freq > 0 and epoch % args.checkpoint_freq == 0:
        ckpt_io.save_checkpoint(out_dir / f"{name}_epoch={epoch}.pth", **save)
    if args.save_last:
        ckpt_io.save_checkpoint(out_dir / f"{name}_last.pth", **save)
    settle_files(args, out_dir, state["hist"])


def wire_recipe(args, run: dict, train_ds, device: torch.device, start_epoch: int) -> None:
    """The recipe manager wraps the optimizer (and may take over the LR and the run length)."""
    gs_builder = None
    if args.gs_loader:
        gs_loader = training.build_gs_loader(args, run["cfg"], train_ds, device)
        gs_builder = sampler_batches(gs_loader, device)
    optimizer, num_epochs, timm_lr = wire_manager(
        args,
        run["manager"],
        run["model"],
        run["optimizer"],
        gs_builder,
        run["eval_loss"],
        run["updates_per_epoch"],
        start_epoch,
    )
    run.update(optimizer=optimizer, num_epochs=num_epochs)
    if not timm_lr:
        run["lr_scheduler"] = None


def start_run_folder(args, run: dict, point: resume.ResumePoint | None) -> None:
    """Rank 0: best-checkpoint history, args.yaml, the recipe copy and W&B in the run folder."""
    if not is_primary(args):  # only rank 0 has a run folder and writes checkpoints
        return
    out_dir = run["out_dir"]
    decreasing = "loss" in args.eval_metric
    name = safe_model_name(args.model)
    run["hist"] = CheckpointHistory(out_dir, name, args.checkpoint_hist, decreasing)
    (out_dir / COMPLETE).unlink(missing_ok=True)  # this run is not complete yet
    recipe_copy = training.write_run_files(args, out_dir)
    if args.log_wandb:
        run["wandb"] = logs.init_wandb(args, out_dir, recipe_copy)
    first = point.start_epoch if point is not None else args.start_epoch or 0
    _logger.info("Output: %s; epochs %d..%d", out_dir, first, run["num_epochs"] - 1)


def train(args, run: dict, start_epoch: int, argv: list[str] | None) -> tuple[dict, dict]:
    """The epoch loop; the completion marker after the last epoch; on any stop, how to resume."""
    model, manager, ema, device = run["model"], run["manager"], run["ema"], run["device"]
    loader_train, lr_scheduler = run["loader_train"], run["lr_scheduler"]
    train_metrics, eval_metrics = {}, {}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, run["num_epochs"]):
            if args.stop_epoch is not None and epoch >= args.stop_epoch:
                break
            if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
                loader_train.sampler.set_epoch(epoch)
            train_metrics = train_one_epoch(
                epoch,
                run["train_model"],
                loader_train,
                run["optimizer"],
                run["train_loss"],
                args,
                device=device,
                amp_autocast=run["amp_autocast"],
                loss_scaler=run["scaler"],
                lr_scheduler=lr_scheduler,
                model_ema=ema,
                mixup_fn=run["mixup_fn"],
            )
            if args.distributed and args.dist_bn in ("broadcast", "reduce"):
                distribute_bn(model, args.world_size, args.dist_bn == "reduce")
            eval_metrics = validate(
                run["train_model"],
                run["loader_eval"],
                args,
                device=device,
                amp_autocast=run["amp_autocast"],
            )
            if ema is not None:
                if manager is not None:
                    training.mask_ema_like_model(ema.module, model)
                if logs.scheduled_sparsity(manager, epoch) == 0.0:
                    eval_metrics = validate(
                        ema.module,
                        run["loader_eval"],
                        args,
                        device=device,
                        amp_autocast=run["amp_autocast"],
                    )
            check_finite_metrics(epoch, train_metrics, eval_metrics)
            with faults.deferred_interrupts():  # summary row and checkpoints: all or nothing
                end_of_epoch(args, run, epoch, train_metrics, eval_metrics)
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        else:
            mark_complete(args, run["out_dir"], run["num_epochs"], eval_metrics)
    except BaseException:  # Ctrl-C, SIGTERM, a lost rank, NaN, a failed write: say how to resume
        report_stop(args, run["out_dir"], epoch, [__file__, *argv] if argv else sys.argv)
        raise
    return train_metrics, eval_metrics


if __name__ == "__main__":
    faults.run_main(main)
