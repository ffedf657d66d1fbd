"""timm glue for ``sparse_training.py``: model, optimizer, AMP, EMA, DDP, loaders, losses, LR
schedule (:func:`build_training` puts them together), run files."""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler

from sparseml.params import PRUNABLE_TYPES
from sparseml.serialization import atomic_copy, atomic_write_text

from . import models as _models  # also registers vit_digits, resnet_digits
from .cli import args_to_yaml
from .compat import patch_timm_posterize
from .data import loader_kwargs, require_batches
from .distributed import is_primary, wrap_ddp
from .errors import SetupError

_logger = logging.getLogger("sparse_training")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The shared builder (``models.build_model``) plus what training adds: ``--num-classes``
    resolved from the model (mixup and the class map need it), gradient checkpointing."""
    model = _models.build_model(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model


def data_config(args: argparse.Namespace, model: torch.nn.Module, verbose: bool) -> dict:
    return resolve_data_config(vars(args), model=model, verbose=verbose)


def resolve_lr(args: argparse.Namespace) -> None:
    """timm's rule: without ``--lr``, scale ``--lr-base`` by the global batch size."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ("sqrt" if any(k in args.opt for k in ("ada", "lamb")) else "")
    args.lr = args.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)


def create_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's optimizer for ``--opt``, or our M-FAC optimizer for ``--opt mfac``.

    M-FAC settings come from ``--opt-kwargs``: ``ngrads`` (window size m, default 1024),
    ``damp`` (default 1e-5), ``sparse=True`` (optimize only the non-zero weights of a pruned
    model, which then stay exactly zero) and ``exact=False`` (float32 Gram products: about 3x
    faster steps, accurate only for damp well above eps_32 of the gradients' scale).
    """
    if args.opt.lower() != "mfac":
        return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    from sparseml.optim import MFAC

    allowed = {"ngrads", "damp", "sparse", "exact"}
    unknown = sorted(set(args.opt_kwargs) - allowed)
    if unknown:
        raise SetupError(f"--opt mfac: unknown --opt-kwargs {unknown}; allowed: {sorted(allowed)}")
    return MFAC(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        **args.opt_kwargs,
    )


def setup_amp(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], Any], NativeScaler | None]:
    """Autocast context factory and (for float16) a loss scaler. ``--amp-dtype`` as given, by
    default float16 on CUDA and bfloat16 elsewhere (CPUs compute it natively or faster)."""
    if not args.amp:
        return contextlib.nullcontext, None
    name = args.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    args.amp_dtype = name  # args.yaml records what ran
    dtype = getattr(torch, name)
    autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)
    scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
    return autocast, scaler


def _mixup_args(args: argparse.Namespace) -> dict[str, Any] | None:
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return dict(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=args.num_classes,
    )


def build_loaders(
    args: argparse.Namespace, cfg: dict, train_ds: Any, eval_ds: Any, device: torch.device
) -> tuple[Any, Any, Mixup | None]:
    """Train and eval loaders; mixup as collate (prefetcher) or as a callable (returned)."""
    mixup = _mixup_args(args)
    if mixup is not None and args.batch_size % 2:
        raise SetupError(f"mixup/cutmix need an even batch size, got -b {args.batch_size}")
    if args.aa:
        patch_timm_posterize()
    collate_fn, mixup_fn = None, None
    if mixup is not None and args.prefetcher:
        collate_fn = FastCollateMixup(**mixup)
    elif mixup is not None:
        mixup_fn = Mixup(**mixup)
    common = loader_kwargs(args, cfg, device)
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = cfg["interpolation"]
    train = create_loader(
        train_ds,
        **{**common, "interpolation": interpolation},
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_split=args.resplit,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats,
        distributed=args.distributed,
        collate_fn=collate_fn,
    )
    require_batches(train, "-b/--batch-size", args.batch_size)
    evals = create_loader(
        eval_ds,
        **common,
        batch_size=args.validation_batch_size or args.batch_size,
        is_training=False,
        distributed=args.distributed,
    )
    return train, evals, mixup_fn


def build_gs_loader(args: argparse.Namespace, cfg: dict, train_ds: Any, device: torch.device):
    """Loader over the training data for the grad sampler (no mixup, no random erasing)."""
    if not args.gs_batch_size:
        raise SetupError("--gs-loader needs -gb/--gs-batch-size N")
    # timm's create_loader sets the data set's transform: a shallow copy keeps the training
    # loader's augmentation from being replaced by the grad sampler's.
    loader = create_loader(
        copy.copy(train_ds),
        **loader_kwargs(args, cfg, device),
        batch_size=args.gs_batch_size,
        is_training=not args.gs_no_training,
        no_aug=args.gs_no_aug,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        auto_augment=args.aa if args.gs_aa else None,
        distributed=args.gs_distributed and args.distributed,
    )
    require_batches(loader, "-gb/--gs-batch-size", args.gs_batch_size)
    return loader


def build_losses(args: argparse.Namespace, mixup_active: bool) -> tuple[Any, Any]:
    """Training loss (soft targets under mixup, label smoothing) and plain CE for validation."""
    if mixup_active:
        train = (
            BinaryCrossEntropy(target_threshold=None) if args.bce_loss else SoftTargetCrossEntropy()
        )
    elif args.smoothing:
        train = (
            BinaryCrossEntropy(smoothing=args.smoothing)
            if args.bce_loss
            else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        )
    else:
        train = torch.nn.CrossEntropyLoss()
    return train, torch.nn.CrossEntropyLoss()


@torch.no_grad()
def mask_ema_like_model(ema_model: torch.nn.Module, model: torch.nn.Module) -> None:
    """Zero the EMA copy of every Linear/Conv weight where the model's weight is zero.

    An average of weights that were pruned at some step decays towards zero but never reaches
    it; copying the model's zeros keeps the EMA model as sparse as the model it tracks.
    """
    ema_layers = dict(ema_model.named_modules())
    for name, layer in model.named_modules():
        if isinstance(layer, PRUNABLE_TYPES) and name in ema_layers:
            weight = ema_layers[name].weight
            # masked_fill, not a multiplication: +0.0 (x * 0 gives -0.0 for negative x, which
            # compressed checkpoints must store) and no NaN kept; the EMA may live on the CPU.
            weight.masked_fill_((layer.weight == 0).to(weight.device), 0.0)


def write_run_files(args: argparse.Namespace, out_dir: Path) -> Path | None:
    """``args.yaml`` and a copy of the recipe (returned) in the run folder."""
    atomic_write_text(out_dir / "args.yaml", args_to_yaml(args))
    if not args.sparseml_recipe:
        return None
    recipe_copy = out_dir / Path(args.sparseml_recipe).name
    if Path(args.sparseml_recipe).resolve() != recipe_copy.resolve():
        atomic_copy(args.sparseml_recipe, recipe_copy)
    return recipe_copy


def build_training(
    args: argparse.Namespace, device: torch.device, train_ds: Any, eval_ds: Any
) -> dict[str, Any]:
    """timm's training parts: model, optimizer, AMP, EMA, DDP, loaders, losses, LR schedule."""
    model = build_model(args)
    cfg = data_config(args, model, verbose=is_primary(args))
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        if device.type != "cuda":
            raise SetupError("--sync-bn needs CUDA; on CPU keep --dist-bn reduce (the default)")
        args.dist_bn = ""
        model = convert_sync_batchnorm(model)
    resolve_lr(args)
    optimizer = create_optimizer(model, args)
    amp_autocast, scaler = setup_amp(args, device)
    ema = None
    if args.model_ema:
        ema_device = "cpu" if args.model_ema_force_cpu else None
        ema = ModelEmaV3(model, decay=args.model_ema_decay, device=ema_device)
    train_model = (
        wrap_ddp(model, device, sync_buffers=not args.no_ddp_bb) if args.distributed else model
    )
    loader_train, loader_eval, mixup_fn = build_loaders(args, cfg, train_ds, eval_ds, device)
    mixup_active = mixup_fn is not None or getattr(loader_train, "mixup_enabled", False)
    train_loss, eval_loss = build_losses(args, mixup_active)
    updates_per_epoch = math.ceil(len(loader_train) / args.grad_accum_steps)
    lr_scheduler, num_epochs = build_scheduler(args, optimizer, updates_per_epoch)
    return dict(
        model=model,
        train_model=train_model,
        cfg=cfg,
        device=device,
        optimizer=optimizer,
        amp_autocast=amp_autocast,
        scaler=scaler,
        ema=ema,
        loader_train=loader_train,
        loader_eval=loader_eval,
        mixup_fn=mixup_fn,
        train_loss=train_loss.to(device),
        eval_loss=eval_loss.to(device),
        lr_scheduler=lr_scheduler,
        num_epochs=num_epochs,
        updates_per_epoch=updates_per_epoch,
    )


def build_scheduler(args: Any, optimizer: Any, updates_per_epoch: int) -> tuple[Any, int]:
    """timm's LR scheduler and the epochs it runs. wsd and rsqrt fit their decay phase into
    the epochs after the warmup, and timm refuses one that does not fit (a ValueError naming
    its own arguments): that is a bad command line, said in the options' names."""
    decay = args.decay_epochs
    if args.sched in ("step", "wsd", "rsqrt") and decay is not None and not decay > 0:
        raise SetupError(  # step divides by it
            f"--decay-epochs {decay:g} is not allowed with --sched {args.sched}: the decay "
            "period (or phase) must be > 0"
        )
    try:
        return create_scheduler_v2(
            optimizer,
            **scheduler_kwargs(args, decreasing_metric="loss" in args.eval_metric),
            updates_per_epoch=updates_per_epoch,
        )
    except ValueError as err:
        if args.sched not in ("wsd", "rsqrt"):
            raise
        room = "--epochs" if args.warmup_prefix else "--epochs minus --warmup-epochs"
        decay = "0.2 (the default)" if args.decay_epochs is None else f"{args.decay_epochs:g}"
        raise SetupError(
            f"--sched {args.sched} with --epochs {args.epochs}, --warmup-epochs "
            f"{args.warmup_epochs} and --decay-epochs {decay} is not allowed: the decay phase "
            f"(epochs, or a fraction in (0, 1) of the schedule) must round to at least one "
            f"epoch and fit in {room}; timm says: {err}"
        ) from None
