"""One training epoch and one evaluation pass, following timm's ``train.py`` (v1.0).

``optimizer`` may be the recipe manager's step wrapper: every optimizer update goes through its
``step()`` (directly or via the AMP scaler), which is where modifiers fire.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

from .distributed import is_primary
from .faults import NonFiniteError

_logger = logging.getLogger("sparse_training")


def _lr(optimizer: Any) -> float:
    lrs = [group["lr"] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def train_one_epoch(
    epoch: int,
    model: torch.nn.Module,
    loader: Any,
    optimizer: Any,
    loss_fn: Callable,
    args: argparse.Namespace,
    *,
    device: torch.device,
    amp_autocast: Callable[[], Any],
    loss_scaler: Any = None,
    lr_scheduler: Any = None,
    model_ema: Any = None,
    mixup_fn: Any = None,
) -> dict[str, float]:
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, "mixup_enabled", False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False
    model.train()
    accum = args.grad_accum_steps
    num_batches = len(loader)
    updates_per_epoch = math.ceil(num_batches / accum)
    num_updates = epoch * updates_per_epoch
    last_accum = num_batches % accum or accum
    losses = AverageMeter()
    skipped = 0
    start = time.time()
    optimizer.zero_grad()
    for batch_idx, (inputs, target) in enumerate(loader):
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum == 0
        steps_in_update = last_accum if batch_idx >= num_batches - last_accum else accum
        if not args.prefetcher:
            inputs, target = inputs.to(device), target.to(device)
            if mixup_fn is not None:
                inputs, target = mixup_fn(inputs, target)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        # DDP must not all-reduce on micro-batches that do not end in an update.
        sync = contextlib.nullcontext()
        if hasattr(model, "no_sync") and not need_update:
            sync = model.no_sync()
        with sync:
            with amp_autocast():
                loss = loss_fn(model(inputs), target) / steps_in_update
            loss_value = loss.item() * steps_in_update
            if not math.isfinite(loss_value) and not args.skip_nonfinite_steps:
                # Raised before backward: nothing of this epoch reaches a checkpoint.
                raise NonFiniteError(
                    f"training loss is {loss_value} in epoch {epoch} at batch {batch_idx + 1}/"
                    f"{num_batches} (update {num_updates - epoch * updates_per_epoch + 1}/"
                    f"{updates_per_epoch}); stopped without saving this epoch. Lower --lr or set "
                    "--clip-grad and resume from the last checkpoint, or pass "
                    "--skip-nonfinite-steps to skip such updates"
                )
            if loss_scaler is not None:
                loss_scaler(
                    loss,
                    optimizer,
                    clip_grad=args.clip_grad,
                    clip_mode=args.clip_mode,
                    parameters=model.parameters(),
                    need_update=need_update,
                )
            else:
                loss.backward()
                # DDP has averaged the gradients, so every rank takes the same decision here.
                if need_update and args.skip_nonfinite_steps and not _grads_finite(model):
                    skipped += 1
                    _logger.warning(
                        "Epoch %d batch %d: NaN/Inf gradients; update skipped (%d so far)",
                        epoch,
                        batch_idx + 1,
                        skipped,
                    )
                elif need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        if math.isfinite(loss_value):
            losses.update(loss_value, inputs.size(0))
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        update_idx = num_updates - epoch * updates_per_epoch
        if is_primary(args) and (update_idx % args.log_interval == 0 or last_batch):
            _logger.info(
                "Train: %d [%d/%d] loss %.4f lr %.3e (%.1f s)",
                epoch,
                update_idx,
                updates_per_epoch,
                losses.avg,
                _lr(optimizer),
                time.time() - start,
            )
    loss_avg = torch.tensor([losses.avg], device=device)
    if args.distributed:
        loss_avg = reduce_tensor(loss_avg, args.world_size)
    return {"loss": float(loss_avg.item())}


def _grads_finite(model: torch.nn.Module) -> bool:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return not norms or bool(torch.isfinite(torch.stack(norms)).all())


def check_finite_metrics(epoch: int, train: dict[str, float], evals: dict[str, float]) -> None:
    """Stop before the epoch's bookkeeping when its losses are NaN/Inf (diverged weights)."""
    for kind, metrics in (("training", train), ("validation", evals)):
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteError(
                f"{kind} metrics of epoch {epoch} are not finite ({bad}): the weights diverged; "
                "stopped without saving this epoch. Lower --lr or set --clip-grad and resume "
                "from the last checkpoint"
            )


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: Any,
    args: argparse.Namespace,
    *,
    device: torch.device,
    amp_autocast: Callable[[], Any],
) -> dict[str, float]:
    """Cross-entropy loss and top-1/top-5 accuracy in percent, averaged over all ranks."""
    model.eval()
    loss_fn = torch.nn.CrossEntropyLoss()
    meters = {"loss": AverageMeter(), "top1": AverageMeter(), "top5": AverageMeter()}
    for inputs, target in loader:
        if not args.prefetcher:
            inputs, target = inputs.to(device), target.to(device)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(inputs)
        values = [
            loss_fn(output.float(), target),
            *accuracy(output, target, topk=(1, min(5, output.size(1)))),
        ]
        for key, value in zip(meters, values):
            if args.distributed:
                value = reduce_tensor(value.detach(), args.world_size)
            meters[key].update(float(value.item()), inputs.size(0))
    return {key: meter.avg for key, meter in meters.items()}
